"""The ``slo-first`` picker: the default policy — meet the SLO, then reserved before burst, then
the cheapest, with affinity and load breaking ties; and never spill silently."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from inferplane.fleet.pricing import request_cost_usd
from inferplane.fleet.state import EndpointView
from inferplane.placement.framework import (
    SPILLOVER_REASONS,
    CycleState,
    Plugin,
    Scored,
    Spillover,
    register,
)
from inferplane.placement.fused_pick import best_of, slo_tied
from inferplane.placement.profile import RequestProfile

_INF = float("inf")


class SloFirstParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prefer_reserved: bool = Field(True, description="reserved before burst among SLO-meeters")
    cost_tolerance: float = Field(
        0.10, ge=0, description="costs within this fraction of the cheapest count as tied"
    )
    cost_epsilon_usd: float = Field(1e-7, ge=0, description="absolute cost tie tolerance")
    include_egress: bool = Field(True, description="rank by cost_usd + egress_usd")
    preferred_kind_max_cost_ratio: float | None = Field(
        None,
        gt=0,
        description="a class's preferred substrate kinds win among SLO-meeters only when their "
        "cost is at most this × the cheapest SLO-meeter's; null: whatever their cost",
    )
    when_none_meets: Literal["fastest", "score"] = Field(
        "score",
        description="no candidate predicted to meet the SLO: the highest total score (affinity "
        "and load keep more of the prompt cached under overload; measured better in the "
        "simulator, docs/benchmarks.md), or the fastest predicted TTFT",
    )


def _reserved(v: EndpointView) -> bool:
    return v.endpoint.capacity_class == "reserved"


@register("slo-first")
class SloFirst(Plugin):
    """Picker: SLO first, then reserved before burst, then cheapest; ties by total score.

    Among candidates annotated ``meets_slo == 1`` (by predicted-latency; unannotated ones count
    as meeting it): keep those of the class's preferred substrate kinds if any
    (``profile.preferred_kinds``: giant-context for long context, low-latency silicon for agent
    steps; within ``preferred_kind_max_cost_ratio`` of the cheapest when set), else the reserved
    ones if any (``prefer_reserved``); keep those whose
    ``cost_usd (+ egress_usd)`` is within ``(1 + cost_tolerance) × cheapest + cost_epsilon_usd``;
    among those take the highest weighted total of the profile's scorers (prefix and session
    affinity, load …), ties at random (seeded). If none meets the SLO: the highest total
    (``when_none_meets: score``, the default) or the lowest predicted ``ttft_s``, ties by
    total (``fastest``), and a note.

    Spillover — every departure from the preferred set is recorded: the preferred pool is the
    reserved endpoints in ``profile.client_region`` (when unset, the region of the cheapest
    reserved candidate) that policy allows (model, context, jurisdiction, precision, kind),
    counting those a filter removed for a departure reason: failing ``/health`` (``outage``),
    ejected (``errors``, ``timeout``, ``rate_limited``), failed an earlier attempt
    (``failover``), reserved capacity exhausted, declared rate limit used up, saturated. When
    that pool had endpoints, none of them both survived and met the SLO (``slo``), and the pick
    is outside it,
    ``cycle.spillover`` records the most serious reason (`SPILLOVER_REASONS`) and every count,
    the regions, the predicted TTFT and cost deltas against the pool's fastest candidate (cost
    at list price when none survived), the RTT delta from the client and the pick's egress. The
    picker only sees filtered candidates, so it can never leave the jurisdiction filter's set.
    Parameters: ``prefer_reserved``, ``cost_tolerance``, ``cost_epsilon_usd``,
    ``include_egress``, ``preferred_kind_max_cost_ratio``.
    """

    Params = SloFirstParams

    def __init__(self, name: str, params: BaseModel) -> None:
        super().__init__(name, params)
        assert isinstance(params, SloFirstParams)
        self.p = params

    def pick(self, cycle: CycleState, scored: list[Scored]) -> Scored:
        ann = cycle.annotations
        p = self.p
        if p.prefer_reserved and not cycle.profile.preferred_kinds:
            # the usual case (no preferred kinds): one walk of the candidates finds the
            # SLO-meeters, reserved or not, and their costs — what `_pick_general` computes
            # with a walk per step, the same values in the same order (`fused_pick.slo_tied`,
            # compiled in the compiled build)
            tied = slo_tied(ann, scored, p.include_egress, p.cost_tolerance, p.cost_epsilon_usd)
            if tied is not None:
                return self._best_of(cycle, scored, tied)
        return self._pick_general(cycle, scored)

    def _pick_general(self, cycle: CycleState, scored: list[Scored]) -> Scored:
        """`pick` step by step: preferred kinds, then reserved, then the cheapest, then the
        total; or the rule for when none meets the SLO."""
        ann = cycle.annotations
        empty: dict[str, float] = {}
        p = self.p
        meets = [
            (s, a)
            for s in scored
            if (a := ann.get(s.view.name, empty)).get("meets_slo", 1.0) >= 0.5
        ]
        if meets:
            pool = meets
            kinds = cycle.profile.preferred_kinds
            preferred = (
                [sa for sa in meets if sa[0].view.endpoint.substrate.kind in kinds]
                if kinds
                else []
            )
            if preferred and p.preferred_kind_max_cost_ratio is not None:
                cheapest = min(self._cost(a) for _, a in meets)
                cap = cheapest * p.preferred_kind_max_cost_ratio + p.cost_epsilon_usd
                preferred = [sa for sa in preferred if self._cost(sa[1]) <= cap]
            if preferred:
                pool = preferred
                cycle.notes.append(
                    f"class prefers {', '.join(sorted(kinds or ()))}: "
                    f"{len(preferred)} of them meet the SLO"
                )
            elif p.prefer_reserved:
                reserved = [
                    sa for sa in meets
                    if sa[0].view.endpoint.capacity_class == "reserved"  # `_reserved`
                ]
                pool = reserved or meets
            if p.include_egress:  # `_cost`, inlined: one per candidate
                costs = [a.get("cost_usd", 0.0) + a.get("egress_usd", 0.0) for _, a in pool]
            else:
                costs = [a.get("cost_usd", 0.0) for _, a in pool]
            limit = min(costs) * (1.0 + p.cost_tolerance) + p.cost_epsilon_usd
            tied = [s for (s, _), c in zip(pool, costs, strict=True) if c <= limit]
        elif p.when_none_meets == "score":
            tied = scored
            cycle.notes.append("no candidate predicted to meet the SLO; picked the best score")
        else:
            ttfts = [ann.get(s.view.name, empty).get("ttft_s", _INF) for s in scored]
            fastest = min(ttfts)
            tied = [s for s, t in zip(scored, ttfts, strict=True) if t <= fastest]
            cycle.notes.append("no candidate predicted to meet the SLO; picked the fastest")
        return self._best_of(cycle, scored, tied)

    def _best_of(self, cycle: CycleState, scored: list[Scored], tied: list[Scored]) -> Scored:
        """The highest total among ``tied`` (a random one of equal totals), its spillover
        recorded: both pick paths end here."""
        choice = best_of(tied, cycle.rng)
        self._spillover(cycle, scored, choice)
        return choice

    def _cost(self, a: dict[str, float]) -> float:
        c = a.get("cost_usd", 0.0)
        return c + a.get("egress_usd", 0.0) if self.p.include_egress else c

    def _spillover(self, cycle: CycleState, scored: list[Scored], choice: Scored) -> None:
        region = cycle.profile.client_region
        chosen_region = choice.view.endpoint.substrate.region
        in_pool = _reserved(choice.view)
        if in_pool and chosen_region == region:
            return  # the pick is in the preferred pool (the common case): no spillover
        ann = cycle.annotations
        empty: dict[str, float] = {}
        prof = cycle.profile
        # preferred endpoints the filters took away for a reason that is a departure (not
        # policy): down, ejected, failed this request, exhausted, saturated
        gone = [
            (v, kind)
            for v, by, why in cycle.removed.values()
            if _reserved(v) and (kind := _departure(by, why)) is not None and _allowed(prof, v)
        ]
        if region is None:
            reserved = [s for s in scored if _reserved(s.view)]
            if reserved:
                cheapest = min(reserved, key=lambda s: self._cost(ann.get(s.view.name, empty)))
                region = cheapest.view.endpoint.substrate.region
                if in_pool and chosen_region == region:
                    return  # the pick is in the preferred pool
            elif gone:
                region = gone[0][0].endpoint.substrate.region
            else:
                return
        pref = [
            s for s in scored if _reserved(s.view) and s.view.endpoint.substrate.region == region
        ]
        pref_gone = [(v, k) for v, k in gone if v.endpoint.substrate.region == region]
        if not pref and not pref_gone:
            return
        if any(s is choice for s in pref):
            return
        slow = [s for s in pref if ann.get(s.view.name, empty).get("meets_slo", 1.0) < 0.5]
        if len(slow) < len(pref):
            return  # a preferred endpoint met the SLO: the pick went elsewhere by policy
        counts: dict[str, int] = {}
        for _, k in pref_gone:
            counts[k] = counts.get(k, 0) + 1
        if slow:
            counts["slo"] = len(slow)
        kinds = sorted(counts, key=SPILLOVER_REASONS.index)
        parts = [f"{counts[k]} {_WORDS[k]}" for k in kinds]
        a_pick = ann.get(choice.view.name, empty)
        best: Scored | None = None
        if pref:
            best = min(pref, key=lambda s: ann.get(s.view.name, empty).get("ttft_s", _INF))
        d_ttft = d_cost = None
        if best is not None:
            a_best = ann.get(best.view.name, empty)
            if "ttft_s" in a_pick and "ttft_s" in a_best:
                d_ttft = a_pick["ttft_s"] - a_best["ttft_s"]
            if "cost_usd" in a_pick and "cost_usd" in a_best:
                d_cost = self._cost(a_pick) - self._cost(a_best)
        elif "cost_usd" in a_pick:
            d_cost = self._cost(a_pick) - _list_cost(prof, pref_gone[0][0], a_pick)
        fleet = cycle.snapshot.fleet
        cycle.spillover = Spillover(
            reason=f"preferred reserved pool in {region}: " + ", ".join(parts),
            preferred=best.view.name if best is not None else pref_gone[0][0].name,
            chosen=choice.view.name,
            from_region=region,
            to_region=chosen_region,
            delta_ttft_s=d_ttft,
            delta_cost_usd=d_cost,
            egress_usd=a_pick.get("egress_usd"),
            kind=kinds[0],
            delta_rtt_s=fleet.rtt_s(prof.client_region or region, chosen_region)
            - fleet.rtt_s(prof.client_region or region, region),
        )


_WORDS = {
    "outage": "failing /health",
    "errors": "ejected for errors",
    "timeout": "ejected for timeouts",
    "rate_limited": "rate-limited (429)",
    "failover": "failed an earlier attempt",
    "reserved_exhausted": "reserved capacity exhausted",
    "saturation": "saturated",
    "slo": "predicted over the SLO",
}


def _departure(filter_name: str, why: str) -> str | None:
    """The spillover reason of an endpoint a filter removed, or None when the removal is policy
    (model, context, jurisdiction, precision, kind…), not a departure."""
    if filter_name == "health":
        if why.startswith("failing /health"):
            return "outage"
        low = why.lower()
        if "429" in low or "rate limit" in low or "rate-limit" in low:
            return "rate_limited"
        if "timeout" in low or "ttft" in low:
            return "timeout"
        return "errors"
    return {
        "failover": "failover",
        "saturation": "saturation",
        "reserved-capacity": "reserved_exhausted",
        "rate-limit": "rate_limited",  # its declared requests/tokens per minute are used up
    }.get(filter_name)


def _allowed(prof: RequestProfile, v: EndpointView) -> bool:
    """Would policy allow this endpoint for the request (model, context, jurisdiction, precision,
    kind, burst)? Filters that ran before the policy filters may have removed it first."""
    sub = v.endpoint.substrate
    m = v.endpoint.models.get(prof.model)
    if m is None or (prof.variant is not None and m.variant != prof.variant):
        return False
    need = prof.prompt_tokens + (prof.max_output_tokens if prof.api != "embeddings" else 0)
    if need > m.max_context:
        return False
    allowed = prof.allowed_jurisdictions
    if allowed is not None and sub.jurisdiction not in allowed:
        return False
    if prof.precisions is not None and m.precision not in prof.precisions:
        return False
    if prof.allowed_kinds is not None and sub.kind not in prof.allowed_kinds:
        return False
    return prof.allow_burst or sub.capacity_class != "burst"


def _list_cost(prof: RequestProfile, v: EndpointView, a_pick: dict[str, float]) -> float:
    """The request's cost on ``v`` at list price, over the pick's predicted duration (for an
    unavailable preferred endpoint, which was never scored)."""
    out = prof.max_output_tokens * 0.5
    ttft = a_pick.get("ttft_raw_s", a_pick.get("ttft_s", 0.0))
    seconds = ttft + out * a_pick.get("itl_raw_s", a_pick.get("itl_s", 0.0))
    return request_cost_usd(
        v.endpoint.cost,
        prompt_tokens=prof.prompt_tokens,
        completion_tokens=int(out),
        seconds=seconds,
        max_concurrency=v.endpoint.max_concurrency,
    )
