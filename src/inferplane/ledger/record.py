"""Decision records: a placement decision together with its measured outcome."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

from inferplane.placement.framework import Decision


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


def decision_to_dict(decision: Decision, outcome: Outcome | None = None) -> dict[str, Any]:
    """A JSON-ready form of a decision and its outcome (the ledger's record)."""
    p = decision.profile
    picked = decision.picked
    out: dict[str, Any] = {
        "decision_id": decision.decision_id,
        "policy": decision.policy,
        "tenant": p.tenant,
        "request": {
            "request_id": p.request_id,
            "model": p.model,
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
            "model_variant": picked.endpoint.models[p.model].variant
            if p.model in picked.endpoint.models
            else None,
            "precision": picked.endpoint.models[p.model].precision
            if p.model in picked.endpoint.models
            else None,
        },
        "removed_by": decision.removed_by,
        "candidates": [asdict(c) for c in decision.candidates],
        "predicted": asdict(decision.predicted),
        "spillover": asdict(decision.spillover) if decision.spillover else None,
        "notes": list(decision.notes),
        "timings_s": decision.timings_s,
        "snapshot_version": decision.snapshot_version,
    }
    if outcome is not None:
        out["outcome"] = asdict(outcome)
    return out


class Ledger(Protocol):
    """Where decision records go. Writes must never block the request path."""

    def record(self, decision: Decision, outcome: Outcome, at_unix: float) -> None: ...

    def get(self, decision_id: str) -> dict[str, Any] | None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...
