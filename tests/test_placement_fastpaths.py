"""The placement hot path's shortcuts give exactly what the plain code gives.

The prefix matcher finds common prefixes by a binary search over slices, the slo-first picker
returns early when the pick is in the preferred pool and finds its pool in one walk when no
kinds are preferred, and predicted-latency reuses the load
terms of an unchanged endpoint state. Each is checked here against the
straightforward version it replaces (``bench/placement_speed.py --dump`` checks whole decision
sequences before and after a change).
"""

from __future__ import annotations

from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from inferplane.placement.framework import Scored
from inferplane.placement.plugins.affinity import PrefixMatcher, _common_prefix
from tests.placement_helpers import cycle, fleet, plugin, profile, snapshot, state, sub


def _naive_common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


hashes = st.lists(st.integers(0, 3), min_size=1, max_size=40).map(tuple)


@settings(max_examples=300, deadline=None)
@given(a=hashes, b=hashes)
def test_common_prefix_matches_the_element_by_element_loop(
    a: tuple[int, ...], b: tuple[int, ...]
) -> None:
    b = (a[0], *b[1:])  # the caller guarantees equal first blocks
    assert _common_prefix(a, b) == _naive_common_prefix(a, b)


@settings(max_examples=100, deadline=None)
@given(recent=st.lists(hashes, max_size=12), engine=hashes)
def test_pending_is_the_longest_shared_run_of_recent_picks(
    recent: list[tuple[int, ...]], engine: tuple[int, ...]
) -> None:
    m = PrefixMatcher("auto", 100, 64, pending_s=10.0)
    m.recent["e"] = deque((5.0, hs) for hs in recent)
    expect = max(
        (_naive_common_prefix(hs, engine) for hs in recent if hs[0] == engine[0]), default=0
    )
    assert m._pending("e", engine, now=6.0) == expect


def test_spillover_early_return_leaves_no_trace_when_the_pick_is_preferred() -> None:
    fl = fleet(sub("eu", n=2), sub("us", region="us-east", jurisdiction="us", capacity="burst"))
    snap = snapshot(fl)
    picker = plugin("slo-first")
    scored = [Scored(v, 0.0, {}) for v in snap.endpoints]
    for region in ("eu-west", None):
        c = cycle(profile(client_region=region), snap)
        choice = picker.pick(c, scored)
        assert choice.view.endpoint.substrate.region == "eu-west"
        assert c.spillover is None and c.notes == []


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from([0.0, 1.0]),  # meets_slo
            st.sampled_from([0.1, 0.1000001, 0.2, 0.5]),  # cost_usd
            st.sampled_from([0.0, 0.05]),  # egress_usd
            st.sampled_from([0.0, 0.5, 1.0]),  # total (ties)
        ),
        min_size=4, max_size=4,
    ),
    egress=st.booleans(),
    tolerance=st.sampled_from([0.0, 0.5]),
    seed=st.integers(0, 3),
)
def test_slo_first_one_walk_picks_what_the_general_path_picks(
    rows: list[tuple[float, float, float, float]], egress: bool, tolerance: float, seed: int
) -> None:
    fl = fleet(sub("eu", n=2), sub("us", n=2, region="us-east", capacity="burst"))
    snap = snapshot(fl)
    picker = plugin("slo-first", include_egress=egress, cost_tolerance=tolerance)
    scored = [Scored(v, total, {}) for v, (*_, total) in zip(snap.endpoints, rows, strict=True)]
    got = []
    for pick in (picker.pick, picker._pick_general):
        c = cycle(profile(client_region="eu-west"), snap, seed=seed)
        for v, (meets, cost, egr, _) in zip(snap.endpoints, rows, strict=True):
            c.annotations[v.name] = {"meets_slo": meets, "cost_usd": cost, "egress_usd": egr}
        choice = pick(c, scored)
        got.append((choice.view.name, c.notes, c.spillover))
    assert got[0] == got[1]


def test_latency_reuses_load_terms_only_for_the_same_state_and_idle_context() -> None:
    """predicted-latency caches what an endpoint's state determines; an idle endpoint's terms
    also depend on the request (prompt + max output), so a different request recomputes."""
    fl = fleet(sub("a", n=2))
    busy = state(inflight=3, inflight_tokens=9000, pending_prefill=1, pending_prefill_tokens=500)
    snap = snapshot(fl, {"a-0": busy})  # a-1 idle
    warm = plugin("predicted-latency")
    requests = [profile(prompt_tokens=p, max_output_tokens=o) for p, o in
                [(1000, 200), (4000, 50), (1000, 200), (30, 3000)]]
    for prof in requests:
        fresh = plugin("predicted-latency")
        c_warm, c_fresh = cycle(prof, snap), cycle(prof, snap)
        assert warm.score(c_warm, list(snap.endpoints)) == fresh.score(
            c_fresh, list(snap.endpoints)
        )
        assert c_warm.annotations == c_fresh.annotations
