"""Fused filtering: the default profile's ten filters in one pass over the candidates.

The framework runs each filter in turn, and each walks the remaining candidates and builds its
own result. Eight of the default profile's filters judge one endpoint at a time, and what four
of them read never changes while the fleet file does not: whether the endpoint serves the
model, variant and API, its jurisdiction, its served precision and its substrate's capacity
class and kind. `FusedFilters` computes those four verdicts once per *request key* (model,
variant, API, allowed jurisdictions, precisions, burst permission, allowed kinds, class) and
endpoint, and then judges each candidate in one walk: the first filter, in profile order, that
removes it (model-served, context-window, health, jurisdiction, precision, capacity-class,
saturation, rate-limit) is the one that removed it — exactly what running them in turn gives,
since each of those removes an endpoint by its own fields alone. The two filters that judge
the remaining set as a whole (``reserved-capacity``: a substrate's summed in-flight requests,
and kept when nothing else remains; ``failure-domain``: only while others remain) then run as
the plugins themselves on what is left.

What the decision records is what the filters in turn record: the same reasons, the same
``removed_by`` counts in filter order, the same ``cycle.removed`` (filter by filter, candidates
in order) and ``cycle.data["saturated"]``. Held to that by ``tests/test_placement_fused.py``
(fused and reference decisions equal on random fleets, loads and requests) and by
``bench/placement_speed.py --dump``. Any other filter list or order runs filter by filter.
"""

from __future__ import annotations

from collections.abc import Callable

from inferplane.fleet.model import Endpoint, Fleet
from inferplane.fleet.state import EndpointView
from inferplane.placement.framework import CycleState, Filter, Policy
from inferplane.placement.plugins.basic import ContextWindow, Health, ModelServed
from inferplane.placement.plugins.constraints import (
    SATURATED_KEY,
    CapacityClassFilter,
    FailureDomain,
    Jurisdiction,
    PrecisionFilter,
    ReservedCapacity,
    Saturation,
    saturation_reason,
)
from inferplane.placement.plugins.rate_limit import RateLimit, rate_limit_reason
from inferplane.placement.profile import RequestProfile

#: The filter classes (exact types, in profile order) that `FusedFilters` runs.
FUSED_FILTERS: tuple[type, ...] = (
    ModelServed,
    ContextWindow,
    Health,
    Jurisdiction,
    PrecisionFilter,
    CapacityClassFilter,
    Saturation,
    RateLimit,
    ReservedCapacity,
    FailureDomain,
)
_MODEL, _CONTEXT, _HEALTH, _JURISDICTION, _PRECISION, _CAPACITY, _SATURATION, _RATE = range(8)
_PASS = 99  # no static filter removes the endpoint
#: request keys remembered per fleet (a tenant or class mix has a handful)
_MAX_KEYS = 1024

#: per endpoint: (first static filter removing it or `_PASS`, its reason, the served model's
#: max context or 0)
_Static = tuple[int, str, int]
#: what a fused filter pass returns: (kept, per filter in profile order its removals)
Removals = list[list[tuple[EndpointView, str]]]


class FusedFilters:
    """Runs a policy's filters in one pass (module docstring). Build with `compile`."""

    __slots__ = ("_fleet", "_plain", "_static", "filters", "names", "saturation", "tail")

    def __init__(self, policy: Policy) -> None:
        self.filters: tuple[Filter, ...] = tuple(policy.filters)
        self.names = tuple(f.name for f in policy.filters)
        sat = policy.filters[_SATURATION]
        assert isinstance(sat, Saturation)
        self.saturation = sat
        self.tail = self.filters[_RATE + 1:]  # reserved-capacity, failure-domain: the plugins
        self._fleet: Fleet | None = None
        #: per fleet position, the last view there whose state passes the health, ejection and
        #: rate-limit checks (healthy, not ejected, no declared rate limit): a view is frozen,
        #: so the same view object passes them again
        self._plain: list[EndpointView | None] = []
        self._static: dict[
            tuple[object, ...], tuple[dict[Endpoint, _Static], dict[Endpoint, int]]
        ] = {}

    @classmethod
    def compile(cls, policy: Policy) -> FusedFilters | None:
        """The fused filter pass for ``policy``, or None when its filters are not exactly the
        fused list (then they run one by one)."""
        if tuple(type(f) for f in policy.filters) != FUSED_FILTERS:
            return None
        names = [f.name for f in policy.filters]
        if len(set(names)) != len(names):
            return None
        return cls(policy)

    def _verdicts(
        self, fleet: Fleet, p: RequestProfile
    ) -> tuple[dict[Endpoint, _Static], dict[Endpoint, int]]:
        """Per endpoint of the fleet: the first of model-served, jurisdiction, precision and
        capacity-class that removes it for this request key, with the filter's reason; and
        the endpoints none of them removes, with the served model's max context."""
        if fleet is not self._fleet or len(self._static) >= _MAX_KEYS:
            self._fleet = fleet
            self._static = {}
            self._plain = []
        key = (p.model, p.variant, p.api, p.allowed_jurisdictions, p.precisions, p.allow_burst,
               p.allowed_kinds, p.workload_class)
        got = self._static.get(key)
        if got is not None:
            return got
        jur = sorted(p.allowed_jurisdictions) if p.allowed_jurisdictions is not None else None
        out = {ep: _verdict(ep, p, jur) for ep in fleet.endpoints}
        passing = {ep: v[2] for ep, v in out.items() if v[0] == _PASS}
        self._static[key] = got = (out, passing)
        return got

    def __call__(
        self, cycle: CycleState, candidates: list[EndpointView]
    ) -> tuple[list[EndpointView], Removals]:
        p = cycle.profile
        fleet = cycle.snapshot.fleet
        verdicts, passing = self._verdicts(fleet, p)
        need_ctx = p.prompt_tokens + (p.max_output_tokens if p.api != "embeddings" else 0)
        need_rate = p.prompt_tokens + p.max_total_output_tokens
        sat = self.saturation
        saturating = p.priority in sat._priorities
        sp = sat.p
        removals: Removals = [[], [], [], [], [], [], [], [], [], []]  # one per `FUSED_FILTERS`
        r_model, r_context, r_health, _, _, _, r_sat, r_rate = removals[:8]
        kept: list[EndpointView] = []
        saturated: list[EndpointView] = []
        limited: list[EndpointView] = []
        plain = self._plain
        for c in candidates:
            ep = c.endpoint
            max_context = passing.get(ep)
            if max_context is not None and need_ctx <= max_context and not saturating:
                i = ep.index
                if i < len(plain) and plain[i] is c:
                    kept.append(c)  # no filter removes it: what the checks below conclude
                    continue
                s = c.state
                if (s.healthy and not s.ejected and s.requests_left is None
                        and s.tokens_left is None):
                    if i >= len(plain):
                        plain.extend([None] * (i + 1 - len(plain)))
                    plain[i] = c
                    kept.append(c)
                    continue
            s = c.state
            got = verdicts.get(ep)
            if got is None:  # not the fleet's endpoint object (a hand-built snapshot)
                allowed = p.allowed_jurisdictions
                got = _verdict(ep, p, sorted(allowed) if allowed is not None else None)
            stage, why, max_context = got
            if stage == _MODEL:
                r_model.append((c, why))
                continue
            if need_ctx > max_context:
                r_context.append((c, f"needs {need_ctx} tokens, max context {max_context}"))
                continue
            if not s.healthy:
                r_health.append((c, "failing /health"))
                continue
            if s.ejected:
                r_health.append((c, f"ejected: {s.ejected_reason or 'outlier'}"))
                continue
            if stage != _PASS:
                removals[stage].append((c, why))
                continue
            if saturating:  # `Saturation.filter`
                reason = saturation_reason(s, ep.spec.max_concurrency, sp)
                if reason is not None:
                    r_sat.append((c, reason))
                    saturated.append(c)
                    continue
            if s.requests_left is not None or s.tokens_left is not None:  # `RateLimit.filter`
                reason = rate_limit_reason(c, need_rate)
                if reason is not None:
                    r_rate.append((c, reason))
                    limited.append(c)
                    continue
            kept.append(c)
        if saturated:
            cycle.data.setdefault(SATURATED_KEY, []).extend(saturated)
        if limited:
            cycle.data.setdefault(SATURATED_KEY, []).extend(limited)
        for i, f in enumerate(self.tail, start=_RATE + 1):
            if not kept:
                break
            result = f.filter(cycle, kept)
            rejected = result.rejected
            if rejected:
                removals[i] = [(c, rejected[c.name]) for c in kept if c.name in rejected]
            kept = result.kept
        return kept, removals



def _verdict(ep: Endpoint, p: RequestProfile, jur: list[str] | None) -> _Static:
    """The first of model-served, jurisdiction, precision and capacity-class that removes
    ``ep`` for request ``p``, with that filter's reason (its own condition and words:
    basic.py, constraints.py), and the served model's max context. ``jur``: the allowed
    jurisdictions sorted, as the jurisdiction filter prints them."""
    m = ep.models.get(p.model)
    if m is None:
        return _MODEL, f"does not serve model {p.model!r}", 0
    if p.variant is not None and m.variant != p.variant:
        return _MODEL, f"serves variant {m.variant!r}, not {p.variant!r}", m.max_context
    if p.api != "chat" and ep.spec.dialect != "openai":
        return _MODEL, f"{ep.spec.dialect} dialect has no {p.api} API", m.max_context
    sub = ep.substrate
    allowed = p.allowed_jurisdictions
    if allowed is not None and sub.jurisdiction not in allowed:
        return _JURISDICTION, f"jurisdiction {sub.jurisdiction!r} not in allowed {jur}", (
            m.max_context
        )
    if p.precisions is not None and m.precision not in p.precisions:
        return _PRECISION, f"serves {m.precision}, tolerated {sorted(p.precisions)}", (
            m.max_context
        )
    if not p.allow_burst and sub.capacity_class == "burst":
        return _CAPACITY, f"burst capacity not allowed for class {p.workload_class!r}", (
            m.max_context
        )
    kinds = p.allowed_kinds
    if kinds is not None and sub.kind not in kinds:
        return _CAPACITY, f"substrate kind {sub.kind!r} not in {sorted(kinds)}", m.max_context
    return _PASS, "", m.max_context


FilterPass = Callable[[CycleState, list[EndpointView]], tuple[list[EndpointView], Removals]]
