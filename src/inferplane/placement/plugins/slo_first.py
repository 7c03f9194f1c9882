"""The ``slo-first`` picker: the default policy — meet the SLO, then reserved before burst, then
the cheapest, with affinity and load breaking ties; and never spill silently."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from inferplane.fleet.state import EndpointView
from inferplane.placement.framework import CycleState, Plugin, Scored, Spillover, register
from inferplane.placement.plugins.constraints import SATURATED_KEY

_INF = float("inf")


class SloFirstParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prefer_reserved: bool = Field(True, description="reserved before burst among SLO-meeters")
    cost_tolerance: float = Field(
        0.10, ge=0, description="costs within this fraction of the cheapest count as tied"
    )
    cost_epsilon_usd: float = Field(1e-7, ge=0, description="absolute cost tie tolerance")
    include_egress: bool = Field(True, description="rank by cost_usd + egress_usd")
    when_none_meets: Literal["fastest", "score"] = Field(
        "fastest",
        description="no candidate predicted to meet the SLO: the fastest predicted TTFT, or the "
        "highest total score (affinity and load keep more of the prompt cached under overload)",
    )


def _reserved(v: EndpointView) -> bool:
    return v.endpoint.substrate.capacity_class == "reserved"


@register("slo-first")
class SloFirst(Plugin):
    """Picker: SLO first, then reserved before burst, then cheapest; ties by total score.

    Among candidates annotated ``meets_slo == 1`` (by predicted-latency; unannotated ones count
    as meeting it): keep the reserved ones if any (``prefer_reserved``); keep those whose
    ``cost_usd (+ egress_usd)`` is within ``(1 + cost_tolerance) × cheapest + cost_epsilon_usd``;
    among those take the highest weighted total of the profile's scorers (prefix and session
    affinity, load …), ties at random (seeded). If none meets the SLO: the lowest predicted
    ``ttft_s``, ties by total, and a note.

    Spillover: the preferred pool is the reserved endpoints in ``profile.client_region`` (when
    unset, the region of the cheapest reserved candidate), counting those the saturation filter
    removed. When that pool had endpoints, none of them both survived and met the SLO, and the
    pick is outside it, ``cycle.spillover`` records the reason, the regions, the predicted TTFT
    and cost deltas against the pool's fastest candidate, and the pick's egress. The picker only
    sees filtered candidates, so it can never leave the jurisdiction filter's set.
    Parameters: ``prefer_reserved``, ``cost_tolerance``, ``cost_epsilon_usd``,
    ``include_egress``.
    """

    Params = SloFirstParams

    def __init__(self, name: str, params: BaseModel) -> None:
        super().__init__(name, params)
        assert isinstance(params, SloFirstParams)
        self.p = params

    def pick(self, cycle: CycleState, scored: list[Scored]) -> Scored:
        ann = cycle.annotations
        empty: dict[str, float] = {}
        p = self.p
        anns = [ann.get(s.view.name, empty) for s in scored]
        meets = [
            (s, a) for s, a in zip(scored, anns, strict=True) if a.get("meets_slo", 1.0) >= 0.5
        ]
        if meets:
            pool = meets
            if p.prefer_reserved:
                reserved = [sa for sa in meets if _reserved(sa[0].view)]
                pool = reserved or meets
            costs = [self._cost(a) for _, a in pool]
            limit = min(costs) * (1.0 + p.cost_tolerance) + p.cost_epsilon_usd
            tied = [s for (s, _), c in zip(pool, costs, strict=True) if c <= limit]
        elif p.when_none_meets == "score":
            tied = scored
            cycle.notes.append("no candidate predicted to meet the SLO; picked the best score")
        else:
            ttfts = [a.get("ttft_s", _INF) for a in anns]
            fastest = min(ttfts)
            tied = [s for s, t in zip(scored, ttfts, strict=True) if t <= fastest]
            cycle.notes.append("no candidate predicted to meet the SLO; picked the fastest")
        best = max([s.total for s in tied])
        top = [s for s in tied if s.total >= best - 1e-12]
        choice = top[0] if len(top) == 1 else cycle.rng.choice(top)
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
        saturated: list[EndpointView] = cycle.data.get(SATURATED_KEY, [])
        if region is None:
            reserved = [s for s in scored if _reserved(s.view)]
            if reserved:
                cheapest = min(reserved, key=lambda s: self._cost(ann.get(s.view.name, empty)))
                region = cheapest.view.endpoint.substrate.region
                if in_pool and chosen_region == region:
                    return  # the pick is in the preferred pool
            else:
                sat = [v for v in saturated if _reserved(v)]
                if not sat:
                    return
                region = sat[0].endpoint.substrate.region
        pref = [
            s for s in scored if _reserved(s.view) and s.view.endpoint.substrate.region == region
        ]
        pref_sat = [v for v in saturated if _reserved(v) and v.endpoint.substrate.region == region]
        if not pref and not pref_sat:
            return
        if any(s is choice for s in pref):
            return
        slow = [s for s in pref if ann.get(s.view.name, empty).get("meets_slo", 1.0) < 0.5]
        if len(slow) < len(pref):
            return  # a preferred endpoint met the SLO: the pick went elsewhere by policy
        parts = []
        if pref_sat:
            parts.append(f"{len(pref_sat)} saturated")
        if slow:
            parts.append(f"{len(slow)} predicted over the SLO")
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
        cycle.spillover = Spillover(
            reason=f"preferred reserved pool in {region}: " + ", ".join(parts),
            preferred=best.view.name if best is not None else pref_sat[0].name,
            chosen=choice.view.name,
            from_region=region,
            to_region=choice.view.endpoint.substrate.region,
            delta_ttft_s=d_ttft,
            delta_cost_usd=d_cost,
            egress_usd=a_pick.get("egress_usd"),
        )
