"""Budgets: reserve the worst case before generation, settle the actual cost after.

A request touches one counter per configured budget that applies to it (the tenant's, its API
key's, its workflow's), each keyed by the calendar window (UTC minute, day or month) it falls in.
Admission reserves the request's **worst-case** cost on all of them at once (`AdmissionStore.
reserve` is atomic), so concurrent requests can never together pass a limit: what is spent plus
what is reserved never exceeds it. Overspend is bounded by how much one request's actual cost can
exceed its reservation (only when the prompt estimate was low or an hourly substrate ran longer
than estimated).

Worst case = the most expensive endpoint that could serve the request (its model, the tenant's
allowed jurisdictions, the class's allowed kinds):

- per-token prices: ``prompt_tokens × input + max_tokens × output`` (USD per million tokens);
- hourly prices: ``hourly_usd / 3600 × seconds / max_concurrency`` with the *estimate*
  ``seconds = min(upstream_timeout_s, prompt × hourly_prefill_s_per_token + max_tokens ×
  hourly_decode_s_per_token)`` (defaults 0.5 ms and 50 ms a token: pessimistic for a loaded
  GPU). The actual charge of an hourly substrate is its measured seconds, so this is an estimate,
  not a bound.
"""

from __future__ import annotations

import calendar
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from inferplane.admission.state import AdmissionStore, CounterDemand
from inferplane.config.schema import AdmissionSpec, BudgetSpec, BudgetWindow, TenantSpec
from inferplane.errors import BudgetExceededError
from inferplane.fleet.model import Fleet
from inferplane.placement.profile import RequestProfile


def window_bounds(window: BudgetWindow, now: float) -> tuple[float, float]:
    """Start and end (epoch seconds, UTC) of the calendar window containing ``now``."""
    if window == "minute":
        start = math.floor(now / 60.0) * 60.0
        return start, start + 60.0
    if window == "day":
        start = math.floor(now / 86400.0) * 86400.0
        return start, start + 86400.0
    d = datetime.fromtimestamp(now, UTC)
    start_dt = datetime(d.year, d.month, 1, tzinfo=UTC)
    end_dt = datetime(d.year + d.month // 12, d.month % 12 + 1, 1, tzinfo=UTC)
    return float(calendar.timegm(start_dt.timetuple())), float(calendar.timegm(end_dt.timetuple()))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class WorstCase:
    """Worst-case USD of a request over the endpoints that could serve it (cached per shape)."""

    def __init__(self, fleet: Fleet, spec: AdmissionSpec, upstream_timeout_s: float) -> None:
        self.fleet = fleet
        self.spec = spec
        self.timeout = upstream_timeout_s
        self._cands: dict[tuple[object, ...], list[tuple[float, float, float, int]]] = {}

    def _candidates(self, p: RequestProfile) -> list[tuple[float, float, float, int]]:
        key = (p.model, p.allowed_jurisdictions, p.allowed_kinds)
        c = self._cands.get(key)
        if c is None:
            c = []
            for e in self.fleet.endpoints:
                if p.model not in e.models:
                    continue
                if p.allowed_jurisdictions is not None and (
                    e.jurisdiction not in p.allowed_jurisdictions
                ):
                    continue
                if p.allowed_kinds is not None and e.substrate.kind not in p.allowed_kinds:
                    continue
                cm = e.cost
                if cm.hourly_usd is not None:
                    c.append((-1.0, 0.0, cm.hourly_usd, e.max_concurrency))
                else:
                    c.append((cm.input_per_mtok or 0.0, cm.output_per_mtok or 0.0, 0.0, 1))
            self._cands[key] = c
        return c

    def usd(self, p: RequestProfile) -> float:
        worst = 0.0
        s = self.spec
        for inp, out, hourly, conc in self._candidates(p):
            if inp < 0:
                seconds = min(
                    self.timeout,
                    p.prompt_tokens * s.hourly_prefill_s_per_token
                    + p.max_total_output_tokens * s.hourly_decode_s_per_token,
                )
                usd = hourly / 3600.0 * seconds / max(1, conc)
            else:
                usd = (p.prompt_tokens * inp + p.max_total_output_tokens * out) / 1e6
            worst = max(worst, usd)
        return worst


@dataclass(slots=True)
class BudgetLease:
    """A reservation held on a request's budget counters until `Budgets.settle`."""

    lease_id: str
    counters: Sequence[CounterDemand]
    usd: float
    tokens: int
    settled: bool = False


class Budgets:
    """Reserve and settle a tenant's budgets in an `AdmissionStore`."""

    def __init__(self, store: AdmissionStore, lease_ttl_s: float) -> None:
        self.store = store
        self.lease_ttl_s = lease_ttl_s

    def counters(
        self,
        tenant: TenantSpec,
        key_hash: str,
        workflow: str | None,
        usd: float,
        tokens: int,
        now: float,
    ) -> list[tuple[BudgetSpec, CounterDemand, float]]:
        """(budget, counter demand, window end) for every budget that applies."""
        out: list[tuple[BudgetSpec, CounterDemand, float]] = []
        for b in tenant.budgets:
            if b.scope == "tenant":
                subject = "-"
            elif b.scope == "key":
                subject = key_hash[7:23]
            else:
                if workflow is None:
                    continue
                subject = workflow
            start, end = window_bounds(b.window, now)
            key = f"budget:{tenant.name}:{b.scope}:{subject}:{b.window}:{int(start)}"
            ttl = end - now + self.lease_ttl_s
            out.append((b, CounterDemand(key, b.usd, b.tokens, usd, tokens, ttl), end))
        return out

    async def reserve(
        self,
        tenant: TenantSpec,
        key_hash: str,
        workflow: str | None,
        usd: float,
        tokens: int,
        lease_id: str,
        now: float | None = None,
    ) -> BudgetLease:
        """Reserve on every applicable budget, or raise 429 ``budget_exceeded``."""
        now = time.time() if now is None else now
        applied = self.counters(tenant, key_hash, workflow, usd, tokens, now)
        demands = [d for _, d, _ in applied]
        if demands:
            failed = await self.store.reserve(demands, lease_id, now + self.lease_ttl_s, now)
            if failed >= 0:
                b, _, end = applied[failed]
                raise _exceeded(tenant.name, b, usd, tokens, end, now, workflow)
        return BudgetLease(lease_id, demands, usd, tokens)

    async def settle(
        self, lease: BudgetLease, usd: float, tokens: int, now: float | None = None
    ) -> None:
        """Drop the lease and add the actual spend, once per lease.

        On `MemoryStore`, `Admission.finish_soon` runs this eagerly, in the caller's task or in
        no task at all: never await here anything but the store's call, nor enter an
        ``asyncio.timeout``."""
        if lease.settled:
            return
        lease.settled = True
        if lease.counters:
            now = time.time() if now is None else now
            await self.store.settle(lease.counters, lease.lease_id, usd, tokens, now)


def _exceeded(
    tenant: str,
    b: BudgetSpec,
    usd: float,
    tokens: int,
    reset_at: float,
    now: float,
    workflow: str | None,
) -> BudgetExceededError:
    limits = " and ".join(
        x
        for x in (
            f"${b.usd:g}" if b.usd is not None else "",
            f"{b.tokens} tokens" if b.tokens is not None else "",
        )
        if x
    )
    who = {
        "tenant": f"tenant {tenant!r}",
        "key": "this API key",
        "workflow": f"workflow {workflow!r}",
    }[b.scope]
    retry_after = max(1, math.ceil(reset_at - now))
    return BudgetExceededError(
        f"{who} has no budget left for this request: the {b.window} budget is {limits}; "
        f"this request reserves up to ${usd:.6f} / {tokens} tokens (its worst case); "
        f"the window resets at {_iso(reset_at)} (in {retry_after} s)",
        code="budget_exceeded",
        headers={"Retry-After": str(retry_after)},
    )
