"""Decision records: a placement decision together with its measured outcome.

`encode_entry` turns ``(decision, outcome, at_unix)`` into an `Entry`: the record's canonical
bytes (canon/1, see `inferplane.ledger.chain`), its receipt and the columns the ledgers index.
Every ledger's ``record()`` returns a `Receipt`: the record's hash at once, and ``durable()`` to
wait until the record is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import orjson

from inferplane.ledger.chain import receipt_of
from inferplane.ledger.query import CURRENT_RECORD_SCHEMA, Page, Query
from inferplane.placement.framework import (
    CandidateRecord,
    Decision,
    Evidence,
    record_fields,
)

RECORD_SCHEMA = CURRENT_RECORD_SCHEMA
"""The ``schema`` field of every record this code writes (docs/evidence.md)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What actually happened to a placed request."""

    status: int
    endpoint: str | None
    ttft_s: float | None = None
    itl_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    cost_usd: float | None = None
    attempts: int = 1
    failed_endpoints: tuple[str, ...] = ()
    error: str | None = None
    usage_source: str | None = None
    """Where the token counts come from: ``upstream`` (the engine's usage), ``counted`` (streamed
    chunks counted by the gateway because no usage arrived), or None (nothing was generated)."""
    energy_j: float | None = None
    """Joules the request drew on its endpoint (`fleet.energy`); None where unknown (providers)."""
    power_source: str | None = None
    """Where the power figure came from: ``live``, ``envelope`` or ``tdp``."""


def decision_to_dict(decision: Decision, outcome: Outcome | None = None) -> dict[str, Any]:
    """A JSON-ready form of a decision and its outcome (the ledger's record)."""
    out = _record(decision)
    out["candidates"] = [asdict(c) for c in decision.candidates]
    out["predicted"] = asdict(decision.predicted)
    out["spillover"] = asdict(decision.spillover) if decision.spillover else None
    if outcome is not None:
        out["outcome"] = asdict(outcome)
    return out


def _record(decision: Decision) -> dict[str, Any]:
    """The record with ``candidates``, ``predicted`` and ``spillover`` left as dataclasses
    (orjson writes those itself, several times faster than ``asdict`` copies them)."""
    p = decision.profile
    picked = decision.picked
    served = picked.endpoint.models.get(p.model) if picked is not None else None
    return {
        "decision_id": decision.decision_id,
        "policy": decision.policy,
        "tenant": p.tenant,
        "request": {
            "request_id": p.request_id,
            "model": p.model,
            "model_alias": p.model_alias,
            "tier_reason": p.tier_reason,
            "api": p.api,
            "workload_class": p.workload_class,
            "priority": p.priority,
            "prompt_tokens": p.prompt_tokens,
            "max_output_tokens": p.max_output_tokens,
            "sequences": p.sequences,
            "prefix_blocks": len(p.block_hashes),
            "session_id": p.session_id,
            "ttft_slo_s": p.ttft_slo_s,
            "itl_slo_s": p.itl_slo_s,
            "allowed_jurisdictions": sorted(p.allowed_jurisdictions)
            if p.allowed_jurisdictions is not None
            else None,
            "client_region": p.client_region,
            "data_region": p.data_region,
            "data_source": p.data_source,
            "stream": p.stream,
        },
        "picked": None
        if picked is None
        else {
            "endpoint": picked.name,
            "substrate": picked.endpoint.substrate.name,
            "hardware": picked.endpoint.substrate.hardware,
            "region": picked.endpoint.region,
            "jurisdiction": picked.endpoint.jurisdiction,
            "capacity_class": picked.endpoint.substrate.capacity_class,
            "model_variant": served.variant if served is not None else None,
            "precision": served.precision if served is not None else None,
        },
        "removed_by": decision.removed_by,
        "candidates": decision.candidates,
        "predicted": decision.predicted,
        "spillover": decision.spillover,
        "notes": list(decision.notes),
        "timings_s": decision.timings_s,
        "snapshot_version": decision.snapshot_version,
    }


@dataclass(frozen=True, slots=True)
class Entry:
    """One encoded record: the indexed columns, the canonical text and its receipt."""

    decision_id: str
    at_unix: float
    tenant: str
    endpoint: str | None
    workload_class: str
    model: str
    substrate: str | None
    status: int
    ttft_s: float | None
    cost_usd: float | None
    text: str
    receipt: str


_FIELDS: dict[type, tuple[str, ...]] = {}


def _plain(obj: Any) -> Any:
    """orjson's ``default`` for dataclasses, so their keys are sorted like a dict's. A
    decision's candidates (`Evidence`) go as dicts of their records' fields, built straight
    from what `place` kept; a `CandidateRecord` is written out field by field (a dict display
    costs a third less than the generic comprehension)."""
    if type(obj) is Evidence:
        return obj.fields()
    if type(obj) is CandidateRecord:
        return record_fields(obj)
    names = _FIELDS.get(type(obj))
    if names is None:
        if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
            raise TypeError(f"Type is not JSON serializable: {type(obj).__name__}")
        names = _FIELDS[type(obj)] = tuple(f.name for f in dataclasses.fields(obj))
    return {n: getattr(obj, n) for n in names}


_OPTS = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS


def encode_entry(decision: Decision, outcome: Outcome, at_unix: float) -> Entry:
    """Encode one record (``decision_to_dict(decision, outcome)`` plus ``at_unix`` and
    ``schema``) in canon/1 form. Raises TypeError/ValueError for a value JSON cannot hold.

    The candidates and the outcome go to orjson as dataclasses (``dataclasses.asdict`` deep
    copies, the bulk of the cost); ``_plain`` gives it their fields so that keys sort.
    """
    rec = _record(decision)
    rec["outcome"] = outcome
    rec["at_unix"] = at_unix
    rec["schema"] = RECORD_SCHEMA
    raw = orjson.dumps(rec, default=_plain, option=_OPTS)
    picked = decision.picked
    return Entry(
        decision_id=decision.decision_id,
        at_unix=at_unix,
        tenant=decision.profile.tenant,
        endpoint=outcome.endpoint,
        workload_class=decision.profile.workload_class,
        model=decision.profile.model,
        substrate=picked.endpoint.substrate.name if picked is not None else None,
        status=outcome.status,
        ttft_s=outcome.ttft_s,
        cost_usd=outcome.cost_usd,
        text=raw.decode(),
        receipt=receipt_of(raw),
    )


class Receipt:
    """What ``Ledger.record`` returns: the record's hash (``hash``, the ``x-inferplane-receipt``
    header) and ``durable()``, which waits until the record is committed (or its write failed
    or timed out: then it returns False and the caller answers anyway)."""

    __slots__ = ("_future", "committed", "hash")

    def __init__(self, hash_: str, future: asyncio.Future[bool] | None = None) -> None:
        self.hash = hash_
        self._future = future
        self.committed: bool | None = True if future is None else None

    async def durable(self, timeout_s: float | None = None) -> bool:
        if self._future is None:
            return bool(self.committed)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):  # not wait_for: see inferplane.waits
                return await asyncio.shield(self._future)
        return False


def resolve(futures: Sequence[asyncio.Future[bool]], ok: bool) -> None:
    """Settle the commit futures of a batch (call on their loop)."""
    for f in futures:
        if not f.done():
            f.set_result(ok)


class Ledger(Protocol):
    """Where decision records go. ``record`` never blocks the request path: it encodes the
    record and hands it to a writer; ``await receipt.durable()`` waits for its commit."""

    def record(self, decision: Decision, outcome: Outcome, at_unix: float) -> Receipt: ...

    async def lookup(self, decision_id: str) -> dict[str, Any] | None:
        """The last record of a decision id (earlier ones under ``"attempts"``), or None."""
        ...

    async def query(self, q: Query) -> Page:
        """One page of a tenant's records (``GET /v1/decisions``)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    @property
    def store_down(self) -> bool:
        """The store is known down (its last write failed and none has committed since, and no
        spool takes the records): answers need not wait for their record's commit."""
        ...

    @property
    def writes_failing(self) -> bool:
        """The store's last write failed and none has committed since, spool or not
        (``inferplane_ledger_store_down``)."""
        ...

    @property
    def spooled(self) -> int:
        """Records in a local spool waiting for the store (``ledger.spool_path``); 0 without
        one (``inferplane_ledger_spooled_records``)."""
        ...
