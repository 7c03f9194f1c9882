"""Constraint filters: jurisdiction, precision, capacity class and saturation.

Each removes the endpoints that break one constraint and gives a reason for each. Jurisdiction,
precision and capacity class are policy (the request may never run elsewhere); saturation is a
load guard that only applies to priorities that can wait or be shed.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from inferplane.fleet.state import EndpointView
from inferplane.placement.framework import CycleState, FilterResult, Plugin, register

#: ``cycle.data`` key under which the saturation filter lists what it removed (the slo-first
#: picker counts those endpoints as part of the preferred pool when it detects spillover).
SATURATED_KEY = "saturated"


@register("jurisdiction")
class Jurisdiction(Plugin):
    """Filter (hard): keep endpoints whose substrate jurisdiction is allowed.

    Rule: ``endpoint.jurisdiction ∈ profile.allowed_jurisdictions`` when that set is not None
    (None means any). Nothing bypasses it: it runs in every shipped profile and the pickers only
    ever see what it kept. Signals: the substrate's static jurisdiction. Parameters: none.
    """

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
            s = c.state
            limit = p.inflight_fraction * c.endpoint.spec.max_concurrency
            reason = None
            if s.inflight >= limit:
                reason = f"in-flight {s.inflight} ≥ envelope {limit:g}"
            elif not s.stale:
                if s.waiting is not None and s.waiting > p.queue_depth_threshold:
                    reason = f"engine queue {s.waiting:g} > {p.queue_depth_threshold:g}"
                elif s.kv_usage is not None and s.kv_usage > p.kv_usage_threshold:
                    reason = f"KV usage {s.kv_usage:.2f} > {p.kv_usage_threshold:g}"
            if reason is None:
                kept.append(c)
            else:
                rejected[c.name] = "saturated: " + reason
                saturated.append(c)
        if saturated:
            cycle.data.setdefault(SATURATED_KEY, []).extend(saturated)
        return FilterResult(kept, rejected)
