"""Constraint filters: jurisdiction, precision, capacity class, saturation, reserved capacity
and failure domain.

Each removes the endpoints that break one constraint and gives a reason for each. Jurisdiction,
precision and capacity class are policy (the request may never run elsewhere); saturation is a
load guard that only applies to priorities that can wait or be shed.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from inferplane.config.schema import SubstrateSpec
from inferplane.fleet.model import Endpoint, Fleet
from inferplane.fleet.state import EndpointState, EndpointView, FleetSnapshot, SnapshotLog
from inferplane.placement.framework import CycleState, FilterResult, Plugin, register

#: ``cycle.data`` key under which the saturation filter lists what it removed (the slo-first
#: picker counts those endpoints as part of the preferred pool when it detects spillover).
SATURATED_KEY = "saturated"


@register("jurisdiction")
class Jurisdiction(Plugin):
    """Filter (hard): keep endpoints whose substrate jurisdiction is allowed.

    Rule: ``endpoint.jurisdiction ∈ profile.allowed_jurisdictions`` when that set is not None
    (None means any). Nothing bypasses it: it is one of the required filters that every
    profile runs, listed or not (`inferplane.placement.build.REQUIRED_FILTERS`), and the pickers
    only ever see what it kept. Signals: the substrate's static jurisdiction. Parameters: none.
    """

    per_endpoint = True

    def filter(self, cycle: CycleState, candidates: list[EndpointView]) -> FilterResult:
        allowed = cycle.profile.allowed_jurisdictions
        if allowed is None:
            return FilterResult(candidates)
        kept: list[EndpointView] = []
        rejected: dict[str, str] = {}
        for c in candidates:
            j = c.endpoint.substrate.jurisdiction
            if j in allowed:
                kept.append(c)
            else:
                rejected[c.name] = f"jurisdiction {j!r} not in allowed {sorted(allowed)}"
        return FilterResult(kept, rejected)


@register("precision")
class PrecisionFilter(Plugin):
    """Filter: keep endpoints serving the model at a tolerated precision.

    Rule: ``served_model.precision ∈ profile.precisions`` when that set is given. Signals: the
    served model's static precision. Parameters: none.
    """

    per_endpoint = True

    def filter(self, cycle: CycleState, candidates: list[EndpointView]) -> FilterResult:
        p = cycle.profile
        if p.precisions is None:
            return FilterResult(candidates)
        kept: list[EndpointView] = []
        rejected: dict[str, str] = {}
        for c in candidates:
            m = c.endpoint.models.get(p.model)
            if m is None or m.precision in p.precisions:
                kept.append(c)
            else:
                rejected[c.name] = f"serves {m.precision}, tolerated {sorted(p.precisions)}"
        return FilterResult(kept, rejected)


@register("capacity-class")
class CapacityClassFilter(Plugin):
    """Filter: the workload class's capacity rules.

    Rules: ``profile.allow_burst`` false removes burst substrates; ``profile.allowed_kinds``,
    when set, removes substrates of other kinds (a sovereign class may exclude provider-api).
    Signals: the substrate's static capacity class and kind. Parameters: none.
    """

    per_endpoint = True

    def filter(self, cycle: CycleState, candidates: list[EndpointView]) -> FilterResult:
        p = cycle.profile
        kinds = p.allowed_kinds
        if p.allow_burst and kinds is None:
            return FilterResult(candidates)
        kept: list[EndpointView] = []
        rejected: dict[str, str] = {}
        for c in candidates:
            sub = c.endpoint.substrate
            if not p.allow_burst and sub.capacity_class == "burst":
                rejected[c.name] = f"burst capacity not allowed for class {p.workload_class!r}"
            elif kinds is not None and sub.kind not in kinds:
                rejected[c.name] = f"substrate kind {sub.kind!r} not in {sorted(kinds)}"
            else:
                kept.append(c)
        return FilterResult(kept, rejected)


class SaturationParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    priorities: list[str] = Field(
        default_factory=lambda: ["sheddable", "batch"],
        description="request priorities the filter applies to",
    )
    queue_depth_threshold: float = Field(5, ge=0, description="engine waiting requests above")
    kv_usage_threshold: float = Field(0.8, ge=0, le=1, description="KV-cache usage above")
    inflight_fraction: float = Field(
        1.0, gt=0, description="gateway in-flight ≥ fraction × max_concurrency"
    )


@register("saturation")
class Saturation(Plugin):
    """Filter: remove endpoints past their concurrency envelope, for low priorities only.

    An endpoint is saturated when gateway ``inflight ≥ inflight_fraction × max_concurrency``,
    or (fresh engine metrics only) ``waiting > queue_depth_threshold`` or
    ``kv_usage > kv_usage_threshold``. Applies when ``profile.priority ∈ priorities``; other
    priorities pass untouched. The thresholds follow the Gateway API Inference Extension's
    saturation detector (queue depth 5, KV-cache utilisation 0.8; ``pkg/epp/saturationdetector``,
    kubernetes-sigs/gateway-api-inference-extension). Removed endpoints are listed under
    ``cycle.data["saturated"]`` for spillover evidence.
    Parameters: ``priorities``, ``queue_depth_threshold``, ``kv_usage_threshold``,
    ``inflight_fraction``.
    """

    per_endpoint = True

    Params = SaturationParams

    def __init__(self, name: str, params: BaseModel) -> None:
        super().__init__(name, params)
        assert isinstance(params, SaturationParams)
        self.p = params
        self._priorities = frozenset(params.priorities)

    def filter(self, cycle: CycleState, candidates: list[EndpointView]) -> FilterResult:
        if cycle.profile.priority not in self._priorities:
            return FilterResult(candidates)
        p = self.p
        kept: list[EndpointView] = []
        rejected: dict[str, str] = {}
        saturated: list[EndpointView] = []
        for c in candidates:
            reason = saturation_reason(c.state, c.endpoint.spec.max_concurrency, p)
            if reason is None:
                kept.append(c)
            else:
                rejected[c.name] = reason
                saturated.append(c)
        if saturated:
            cycle.data.setdefault(SATURATED_KEY, []).extend(saturated)
        return FilterResult(kept, rejected)


def saturation_reason(s: EndpointState, max_concurrency: int,
                      p: SaturationParams) -> str | None:
    """Why an endpoint in state ``s`` is saturated under ``p`` (``saturated: …``), or None.
    `Saturation` and the fused filter pass both ask this."""
    limit = p.inflight_fraction * max_concurrency
    if s.inflight >= limit:
        return f"saturated: in-flight {s.inflight} ≥ envelope {limit:g}"
    if not s.stale:
        if s.waiting is not None and s.waiting > p.queue_depth_threshold:
            return f"saturated: engine queue {s.waiting:g} > {p.queue_depth_threshold:g}"
        if s.kv_usage is not None and s.kv_usage > p.kv_usage_threshold:
            return f"saturated: KV usage {s.kv_usage:.2f} > {p.kv_usage_threshold:g}"
    return None


def committed_capacity(fleet: Fleet) -> dict[str, tuple[int, frozenset[str]]]:
    """Reserved substrate → (committed concurrency, its endpoint names). The size defaults to
    the sum of the endpoints' ``max_concurrency``."""
    subs: dict[str, SubstrateSpec] = {}
    eps: dict[str, list[str]] = {}
    size: dict[str, int] = {}
    for e in fleet.endpoints:
        sub = e.substrate
        if sub.capacity_class != "reserved":
            continue
        subs[sub.name] = sub
        eps.setdefault(sub.name, []).append(e.name)
        size[sub.name] = size.get(sub.name, 0) + e.spec.max_concurrency
    return {n: (subs[n].committed_concurrency or size[n], frozenset(eps[n])) for n in eps}


@register("reserved-capacity")
class ReservedCapacity(Plugin):
    """Filter (soft): reserved capacity has a size; past it, go to burst or provider capacity.

    A reserved substrate is *exhausted* when the gateway's in-flight requests on its endpoints
    reach its ``committed_concurrency`` (default: the sum of its endpoints'
    ``max_concurrency``). Its endpoints are removed with the reason ``reserved capacity
    exhausted`` — the slo-first picker records the move as a ``reserved_exhausted`` spillover —
    unless nothing else would remain: then they stay (the request waits on its reservation
    rather than failing) and a note says so. Signals: gateway in-flight per endpoint; the
    substrate's static capacity class and size. Parameters: none.
    """

    def __init__(self, name: str, params: BaseModel) -> None:
        super().__init__(name, params)
        self._fleet: Fleet | None = None
        self._committed: dict[str, tuple[int, frozenset[str]]] = {}
        self._positions: dict[str, list[int]] = {}  # substrate → its endpoints' fleet positions
        self._snap: object = None  # the snapshot `_used` was summed on
        self._used: dict[str, int] = {}
        # with a live fleet's snapshots (`FleetSnapshot.log`): every reserved substrate's sum,
        # the in-flight count summed for each position (its substrate's name, or None), and the
        # snapshot's serial; a new snapshot corrects the sums where its log says a view changed
        self._log: SnapshotLog | None = None
        self._serial = -1
        self._counted: list[int] = []
        self._substrate_at: list[str | None] = []

    def _in_flight(self, snap: FleetSnapshot, name: str) -> int:
        """Gateway in-flight requests on a substrate's endpoints, summed once per snapshot (a
        large fleet's decision would otherwise read every endpoint of every candidate pool);
        with a live fleet's snapshots, corrected from the last snapshot's sums where a view
        changed (a request's reservation and release: one each) instead of summed anew."""
        if snap is not self._snap:
            if not self._follow(snap):
                self._used = {}
            self._snap = snap
        used = self._used.get(name)
        if used is None:
            views = snap.endpoints
            if len(views) == len(snap.fleet.endpoints):  # in fleet order (the live fleet's)
                used = 0
                for i in self._positions[name]:  # (a plain loop: the cheapest sum here)
                    used += views[i].state.inflight
            else:  # a hand-built snapshot
                by = snap.by_name
                used = sum(by[e].state.inflight for e in self._committed[name][1] if e in by)
            self._used[name] = used
        return used

    def _follow(self, snap: FleetSnapshot) -> bool:
        """Bring ``_used`` to ``snap`` from the live fleet's log (True), or let the caller sum
        anew (False: a hand-built snapshot). Sums every reserved substrate when the log cannot
        say what changed since the last snapshot read (the first, a reload, too long ago)."""
        log = snap.log
        views = snap.endpoints
        if log is None or len(views) != len(snap.fleet.endpoints):
            self._log = None
            return False
        changed = (
            log.changed_between(self._serial, snap.serial)
            if log is self._log and len(self._counted) == len(views)
            else None
        )
        self._log, self._serial = log, snap.serial
        if changed is None:
            where: list[str | None] = [None] * len(views)
            for name, positions in self._positions.items():
                for i in positions:
                    where[i] = name
            self._substrate_at = where
            self._counted = [v.state.inflight for v in views]
            self._used = {
                sub: sum(self._counted[i] for i in positions)
                for sub, positions in self._positions.items()
            }
            return True
        counted, at, used = self._counted, self._substrate_at, self._used
        for i in changed:
            n = views[i].state.inflight
            if n != counted[i]:
                sub = at[i]
                if sub is not None:
                    used[sub] += n - counted[i]
                counted[i] = n
        return True

    def filter(self, cycle: CycleState, candidates: list[EndpointView]) -> FilterResult:
        snap = cycle.snapshot
        if snap.fleet is not self._fleet:
            self._fleet, self._committed = snap.fleet, committed_capacity(snap.fleet)
            self._positions = {}
            for i, e in enumerate(snap.fleet.endpoints):
                if e.substrate.name in self._committed:
                    self._positions.setdefault(e.substrate.name, []).append(i)
            self._log, self._snap = None, None  # positions of another fleet: sum anew
        committed = self._committed
        if not committed:
            return FilterResult(candidates)
        subs = {c.endpoint.substrate_name for c in candidates} & committed.keys()
        if not subs:
            return FilterResult(candidates)
        full: dict[str, str] = {}
        for name in subs:
            size = committed[name][0]
            used = self._in_flight(snap, name)
            if used >= size:
                full[name] = f"reserved capacity exhausted: {used}/{size} in flight"
        if not full:
            return FilterResult(candidates)
        kept = [c for c in candidates if c.endpoint.substrate_name not in full]
        if not kept:
            cycle.notes.append(
                "reserved capacity exhausted and no other capacity allowed: kept on reserved"
            )
            return FilterResult(candidates)
        rejected = {
            c.name: full[c.endpoint.substrate_name]
            for c in candidates
            if c.endpoint.substrate_name in full
        }
        return FilterResult(kept, rejected)


def failure_domain(endpoint: Endpoint) -> str | None:
    """An endpoint's failure domain: its substrate's ``failure_domain``, else its zone, else
    None (unknown: no preference)."""
    sub = endpoint.substrate
    return sub.failure_domain or sub.zone or None


@register("failure-domain")
class FailureDomain(Plugin):
    """Filter (soft): after a failed attempt, prefer another failure domain, then another zone.

    On a re-placement, ``profile.avoid_domains`` holds the failed endpoints' failure domains and
    zones (``fd:<failure_domain>``, ``zone:<zone>``). Candidates sharing a failed failure domain
    are removed when candidates elsewhere remain; then those sharing a failed zone, when
    candidates in other zones remain. It never empties the set: a correlated failure is likely,
    not certain. Signals: the substrate's static ``failure_domain`` and ``zone``. Parameters:
    none.
    """

    def filter(self, cycle: CycleState, candidates: list[EndpointView]) -> FilterResult:
        avoid = cycle.profile.avoid_domains
        if not avoid:
            return FilterResult(candidates)
        rejected: dict[str, str] = {}
        kept = candidates
        for prefix, attr in (("fd:", "failure_domain"), ("zone:", "zone")):
            bad = [c for c in kept if getattr(c.endpoint.substrate, attr)
                   and prefix + getattr(c.endpoint.substrate, attr) in avoid]
            if bad and len(bad) < len(kept):
                for c in bad:
                    what = attr.replace("_", " ")
                    rejected[c.name] = (
                        f"same {what} {getattr(c.endpoint.substrate, attr)!r} as a failed attempt"
                    )
                kept = [c for c in kept if c.name not in rejected]
        return FilterResult(kept, rejected)
