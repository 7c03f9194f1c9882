"""The ``slo-first`` picker's usual path, as plain functions the compiled build compiles.

`SloFirst.pick` (``placement/plugins/slo_first.py``) stays the plugin — its parameters, its
registration and the spillover record are there — and calls these for the steps that walk the
candidates: `slo_tied` (the SLO-meeters, reserved before the others, within the cost tolerance
of the cheapest) and `best_of` (the highest total among them, ties at random). They are the
same operations in the same order as the plugin ran them inline (``bench/placement_speed.py
--dump`` byte-identical; ``tests/test_placement_fastpaths.py`` holds them to `_pick_general`),
in a module of their own so that mypyc compiles them (the plugin module does not compile: its
pydantic parameter model and ``@register``; docs/placement.md, "The compiled build").
"""

from __future__ import annotations

import random

from inferplane.placement.scored import Scored


def slo_tied(
    ann: dict[str, dict[str, float]],
    scored: list[Scored],
    egress: bool,
    tolerance: float,
    epsilon: float,
) -> list[Scored] | None:
    """The candidates `SloFirst.pick` chooses among when it prefers reserved endpoints and the
    request has no preferred kinds: those annotated ``meets_slo`` (unannotated: met), the
    reserved ones among them if any, whose cost (``cost_usd``, ``+ egress_usd`` when
    ``egress``) is at most ``cheapest × (1 + tolerance) + epsilon``, in candidate order. None
    when no candidate meets the SLO (the plugin's general path decides then)."""
    empty: dict[str, float] = {}
    r_s: list[Scored] = []  # reserved SLO-meeters, in candidate order
    r_c: list[float] = []  # their costs (`SloFirst._cost`)
    o_s: list[Scored] = []  # the others that meet it
    o_c: list[float] = []
    for s in scored:
        v = s.view
        a = ann.get(v.name, empty)
        m = a.get("meets_slo")  # (a default would be a float boxed per call, compiled)
        if m is None or m >= 0.5:
            got = a.get("cost_usd")
            c = 0.0 if got is None else got
            if egress:
                got = a.get("egress_usd")
                c = c + (0.0 if got is None else got)
            if v.endpoint.capacity_class == "reserved":  # `slo_first._reserved`
                r_s.append(s)
                r_c.append(c)
            else:
                o_s.append(s)
                o_c.append(c)
    if r_s:
        pool, costs = r_s, r_c
    elif o_s:
        pool, costs = o_s, o_c
    else:
        return None
    cheapest = costs[0]  # min(costs), without the builtin's generic comparisons
    for c in costs:
        if c < cheapest:
            cheapest = c
    limit = cheapest * (1.0 + tolerance) + epsilon
    return [pool[i] for i in range(len(pool)) if costs[i] <= limit]


def best_of(tied: list[Scored], rng: random.Random) -> Scored:
    """The highest total among ``tied`` (non-empty); of totals within 1e-12 of it, the first
    when it is alone, else one chosen by ``rng``."""
    best = tied[0].total  # max(s.total for s in tied), compared as the builtin compares
    for s in tied:
        if s.total > best:
            best = s.total
    top = [s for s in tied if s.total >= best - 1e-12]
    return top[0] if len(top) == 1 else rng.choice(top)
