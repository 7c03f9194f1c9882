"""Table-driven tests of the scorers, the prefix index and the baseline pickers."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Any

import pytest

from inferplane.config.loader import parse_config
from inferplane.fleet.model import Fleet
from inferplane.fleet.prefix_index import PrefixIndex
from inferplane.physics import get_hardware
from inferplane.physics.calibration import Calibration, dump_profile
from inferplane.placement.framework import Scored
from inferplane.placement.latency_terms import kept_load_terms
from tests.builders import model, pool_fleet, to_yaml
from tests.placement_helpers import (
    MODEL,
    cycle,
    fleet,
    hetero,
    plugin,
    profile,
    snapshot,
    state,
    sub,
    views,
)

FLEET = Fleet.from_config(hetero())
HASHES = tuple(range(1000, 1016))  # 16 blocks of 64 tokens = 1024 tokens


def scores(
    type_name: str,
    prof_kw: dict[str, Any] | None = None,
    states: dict[str, Any] | None = None,
    names: tuple[str, ...] = (),
    fl: Fleet = FLEET,
    index: PrefixIndex | None = None,
    **params: Any,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    snap = snapshot(fl, states, prefix_index=index)
    cyc = cycle(profile(**(prof_kw or {})), snap)
    cands = (
        views(snap, *names)
        if names
        else [v for v in snap.endpoints if "llama-3.1-8b" in v.endpoint.models]
    )
    vals = list(plugin(type_name, **params).score(cyc, cands))
    assert len(vals) == len(cands)
    assert all(0.0 <= v <= 1.0 for v in vals), vals
    return {c.name: v for c, v in zip(cands, vals, strict=True)}, cyc.annotations


# -- prefix index -------------------------------------------------------------------------------


def test_prefix_index_leading_run_and_lru() -> None:
    idx = PrefixIndex(capacity_blocks=4)
    idx.record("e", [1, 2, 3])
    assert idx.match_length("e", [1, 2, 3, 4]) == 3
    assert idx.match_length("e", [2, 3]) == 2
    assert idx.match_length("e", [9, 1]) == 0  # leading run only
    assert idx.match_length("other", [1]) == 0
    idx.record("e", [1, 5, 6])  # touches 1, evicts 2 (least recently used) then 3
    assert idx.size("e") == 4
    assert idx.match_length("e", [1, 2]) == 1
    assert idx.match_length("e", [1, 5, 6]) == 3
    idx.set_capacity("e", 2)
    assert idx.size("e") == 2 and idx.match_length("e", [5, 6]) == 2


def test_prefix_index_kv_events() -> None:
    class BlockStored:
        def __init__(self, hashes: list[int]) -> None:
            self.block_hashes = hashes

    class BlockRemoved(BlockStored):
        pass

    class AllBlocksCleared:
        pass

    idx = PrefixIndex()
    assert not idx.covers("e")
    idx.apply("e", BlockStored([1, 2, 3]))
    assert idx.covers("e") and idx.match_length("e", [1, 2, 3]) == 3
    idx.apply("e", BlockRemoved([2]))
    assert idx.match_length("e", [1, 2, 3]) == 1
    idx.apply("e", AllBlocksCleared())
    assert idx.covers("e") and idx.match_length("e", [1]) == 0
    with pytest.raises(ValueError, match="unknown KV event"):
        idx.apply("e", object())
    idx.forget("e")
    assert not idx.covers("e")


# -- predicted latency --------------------------------------------------------------------------


def test_predicted_latency_annotates_every_candidate() -> None:
    vals, ann = scores("predicted-latency")
    for name in vals:
        a = ann[name]
        assert {"ttft_s", "itl_s", "meets_slo", "uncached_tokens", "queue_s"} <= set(a)
        assert a["ttft_s"] > 0 and a["itl_s"] > 0
        assert a["meets_slo"] == (1.0 if vals[name] >= 0.5 else 0.0)
    # the provider API pays its network RTT; the US endpoints the EU↔US RTT only with a client
    assert ann["us-api-0"]["ttft_s"] > 0.2
    assert ann["eu-h100-0"]["ttft_s"] < 0.2


@pytest.mark.parametrize(
    ("st", "slower"),
    [
        ({"waiting": 20.0, "inflight": 4, "inflight_tokens": 8000}, True),  # engine queue
        ({"inflight": 100, "inflight_tokens": 200_000, "stale": True}, True),  # past envelope
        ({"running": 60.0}, True),  # bigger running batch: slower steps
        ({"waiting": 50.0, "stale": True}, False),  # stale engine signals ignored
    ],
)
def test_predicted_latency_load(st: dict[str, Any], slower: bool) -> None:
    _, ann = scores(
        "predicted-latency", states={"eu-h100-0": state(**st)}, names=("eu-h100-0", "eu-h100-1")
    )
    t0, t1 = ann["eu-h100-0"]["ttft_s"], ann["eu-h100-1"]["ttft_s"]
    assert (t0 > t1 * 1.05) is slower


def test_predicted_latency_uses_cached_prefix_precise_then_approximate() -> None:
    idx = PrefixIndex()
    idx.block_stored("eu-h100-0", HASHES)  # covered: all 16 blocks cached
    prof = {"prompt_tokens": 1024, "block_hashes": HASHES}
    _, ann = scores("predicted-latency", prof, names=("eu-h100-0", "eu-h100-1"), index=idx)
    assert ann["eu-h100-0"]["uncached_tokens"] == 1  # at least the last token is computed
    assert ann["eu-h100-1"]["uncached_tokens"] == 1024
    assert ann["eu-h100-0"]["ttft_s"] < ann["eu-h100-1"]["ttft_s"]

    # approximate: learned from a pick on eu-h100-1 (not covered by the precise index)
    p = plugin("predicted-latency")
    snap = snapshot(FLEET, prefix_index=idx)
    cyc = cycle(profile(**prof), snap)
    p.score(cyc, views(snap, "eu-h100-1"))
    p.on_picked(cyc, snap.by_name["eu-h100-1"])
    cyc2 = cycle(profile(**prof), snap)
    p.score(cyc2, views(snap, "eu-h100-1"))
    assert cyc2.annotations["eu-h100-1"]["uncached_tokens"] == 1


@pytest.mark.parametrize(("observed_ratio", "factor"), [(2.0, 2.0), (10.0, 4.0), (0.1, 0.5)])
def test_predicted_latency_online_correction(observed_ratio: float, factor: float) -> None:
    """TTFT × the endpoint's median observed ÷ predicted ratio, clamped to [0.5, 4]."""
    p = plugin("predicted-latency")
    snap = snapshot(FLEET)
    cyc = cycle(profile(), snap)
    p.score(cyc, views(snap, "eu-h100-0"))
    base = cyc.annotations["eu-h100-0"]["ttft_s"]
    assert cyc.annotations["eu-h100-0"]["ttft_raw_s"] == pytest.approx(base)
    snap2 = snapshot(FLEET, {"eu-h100-0": state(ttft_ratio_p50=observed_ratio)})
    cyc2 = cycle(profile(), snap2)
    p.score(cyc2, views(snap2, "eu-h100-0"))
    assert cyc2.annotations["eu-h100-0"]["ttft_s"] == pytest.approx(base * factor)
    assert cyc2.annotations["eu-h100-0"]["ttft_raw_s"] == pytest.approx(base)


def test_live_fleet_feeds_the_ttft_ratio() -> None:
    from inferplane.fleet.live import LiveFleet

    t = [0.0]
    live = LiveFleet(snapshot(FLEET).fleet, clock=lambda: t[0])
    for actual in (0.2, 0.3, 0.4):
        live.observe_ttft("eu-h100-0", actual, predicted=0.1)
    t[0] = 1.0
    assert live.snapshot().by_name["eu-h100-0"].state.ttft_ratio_p50 == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("slo", "meets"),
    [
        ({"ttft_slo_s": 10.0}, 1.0),
        ({"ttft_slo_s": 0.001}, 0.0),
        ({"ttft_slo_s": None, "itl_slo_s": 1e-6}, 0.0),
        ({"ttft_slo_s": None, "itl_slo_s": None}, 1.0),
    ],
)
def test_predicted_latency_slo(slo: dict[str, Any], meets: float) -> None:
    vals, ann = scores("predicted-latency", slo, names=("eu-h100-0",))
    assert ann["eu-h100-0"]["meets_slo"] == meets
    assert (vals["eu-h100-0"] >= 0.5) == (meets == 1.0)


def test_predicted_latency_client_region_rtt() -> None:
    _, near = scores("predicted-latency", {"client_region": "us-east"}, names=("us-h100-0",))
    _, far = scores("predicted-latency", {"client_region": "eu-west"}, names=("us-h100-0",))
    assert far["us-h100-0"]["ttft_s"] - near["us-h100-0"]["ttft_s"] == pytest.approx(0.08)


@pytest.mark.parametrize(
    ("error_rate", "params", "factor"),
    [
        (0.0, {}, 1.0),  # error-free: exactly the prediction without the term
        (0.2, {}, 1.25),  # 1 ÷ (1 - e)
        (0.5, {}, 2.0),
        (0.5, {"error_weight": 0.5}, 1.5),  # 1 + w × e ÷ (1 - e)
        (0.5, {"error_weight": 0.0}, 1.0),  # off
        (1.0, {}, 21.0),  # e clamped to max_error_rate 0.95: 1 + 1 ÷ 0.05
        (1.0, {"max_error_rate": 0.5}, 3.0),
    ],
)
def test_predicted_latency_expected_retry_cost(
    error_rate: float, params: dict[str, Any], factor: float
) -> None:
    """The scored TTFT × the expected retry cost of the endpoint's error rate, the score ÷ it;
    the peer and the annotated single-attempt predictions are untouched."""
    names = ("eu-h100-0", "eu-h100-1")
    ttft_only = {"itl_slo_s": None}  # the score follows TTFT (ITL is not inflated)
    base_vals, base = scores(
        "predicted-latency", ttft_only, states={"eu-h100-0": state()}, names=names, **params
    )
    vals, ann = scores(
        "predicted-latency",
        ttft_only,
        states={"eu-h100-0": state(error_rate=error_rate)},
        names=names,
        **params,
    )
    # one attempt's TTFT (the first-byte timeout's base) is unchanged; the score is not
    assert ann["eu-h100-0"]["ttft_s"] == base["eu-h100-0"]["ttft_s"]
    assert ann["eu-h100-0"]["ttft_raw_s"] == base["eu-h100-0"]["ttft_raw_s"]
    assert ann["eu-h100-0"].get("retry_factor", 1.0) == pytest.approx(factor)
    x0 = 1.0 / base_vals["eu-h100-0"] - 1.0  # TTFT ÷ SLO without the term
    assert vals["eu-h100-0"] == pytest.approx(1.0 / ((1.0 + x0 * factor) * factor))
    assert ann["eu-h100-1"] == base["eu-h100-1"]
    if factor == 1.0:
        assert vals == base_vals and ann == base  # byte-identical decisions at e = 0
    else:
        assert vals["eu-h100-0"] < base_vals["eu-h100-0"]


def test_predicted_latency_retry_cost_can_miss_the_slo() -> None:
    """A failing endpoint stops meeting a TTFT SLO its prediction alone would meet."""
    _, ok = scores("predicted-latency", states={"eu-h100-0": state()}, names=("eu-h100-0",))
    slo = {"ttft_slo_s": ok["eu-h100-0"]["ttft_s"] * 1.5}
    _, met = scores("predicted-latency", slo, {"eu-h100-0": state()}, names=("eu-h100-0",))
    _, ann = scores(
        "predicted-latency", slo, {"eu-h100-0": state(error_rate=0.5)}, names=("eu-h100-0",)
    )
    assert met["eu-h100-0"]["meets_slo"] == 1.0 and ann["eu-h100-0"]["meets_slo"] == 0.0


# -- affinity -----------------------------------------------------------------------------------


def test_prefix_affinity_learns_from_picks() -> None:
    fl = fleet(sub("a", n=2))
    p = plugin("prefix-affinity")
    snap = snapshot(fl)
    prof = profile(block_hashes=HASHES)
    assert list(p.score(cycle(prof, snap), views(snap))) == [0.0, 0.0]
    p.on_picked(cycle(prof, snap), snap.by_name["a-1"])
    half = profile(block_hashes=(*HASHES[:8], 1, 2, 3, 4, 5, 6, 7, 8))
    cyc = cycle(half, snap)
    assert list(p.score(cyc, views(snap))) == [0.0, 0.5]
    assert cyc.annotations["a-1"]["prefix_match"] == 8


def test_prefix_affinity_capacity_from_engine_blocks() -> None:
    fl = fleet(sub("a"))
    p = plugin("prefix-affinity", block_tokens=64)
    snap = snapshot(fl, {"a-0": state(num_gpu_blocks=16, block_size=16)})  # 256 tokens = 4 blocks
    p.on_picked(cycle(profile(block_hashes=HASHES), snap), snap.by_name["a-0"])
    assert p.matcher.index.size("a-0") == 4


@pytest.mark.parametrize(
    ("mode", "expect"), [("auto", [1.0, 0.5]), ("precise", [1.0, 0.0]), ("approximate", [0.0, 0.5])]
)
def test_prefix_affinity_modes(mode: str, expect: list[float]) -> None:
    fl = fleet(sub("a", n=2))
    idx = PrefixIndex()
    idx.block_stored("a-0", HASHES)  # a-0 covered by KV events, a-1 not
    p = plugin("prefix-affinity", mode=mode)
    p.matcher.index.record("a-1", HASHES[:8])
    snap = snapshot(fl, prefix_index=idx)
    assert list(p.score(cycle(profile(block_hashes=HASHES), snap), views(snap))) == expect


def test_session_affinity_bounded_lru() -> None:
    fl = fleet(sub("a", n=2))
    p = plugin("session-affinity", max_sessions=2)
    snap = snapshot(fl)
    for sid, ep in (("s1", "a-1"), ("s2", "a-0"), ("s3", "a-0")):
        p.on_picked(cycle(profile(session_id=sid), snap), snap.by_name[ep])
    assert list(p.score(cycle(profile(session_id="s1"), snap), views(snap))) == [0.0, 0.0]
    assert list(p.score(cycle(profile(session_id="s2"), snap), views(snap))) == [1.0, 0.0]
    assert list(p.score(cycle(profile(), snap), views(snap))) == [0.0, 0.0]


# -- load, cost, locality, energy ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("st", "expect"),
    [
        ({}, 1.0),
        ({"inflight": 64}, 2 / 3),
        ({"kv_usage": 0.5}, 1 - 0.5 / 3),
        ({"kv_usage": 0.5, "stale": True}, 1.0),
        ({"num_gpu_blocks": 100, "block_size": 10, "inflight_tokens": 500}, 1 - 0.5 / 3),
    ],
)
def test_load(st: dict[str, Any], expect: float) -> None:
    vals, _ = scores("load", states={"eu-h100-0": state(**st)}, names=("eu-h100-0",))
    assert vals["eu-h100-0"] == pytest.approx(expect)


def test_cost_cheapest_first_and_burst_factor() -> None:
    vals, ann = scores("cost")
    costs = {n: ann[n]["cost_usd"] for n in vals}
    cheapest = min(costs, key=lambda n: costs[n])
    priciest = max(
        costs, key=lambda n: costs[n] * (1.25 if n in ("eu-a100-0", "us-groq-0", "us-api-0") else 1)
    )
    assert vals[cheapest] == 1.0 and vals[priciest] == 0.0
    # per-token: (1000 × 0.2 + 100 × 0.2) / 1e6
    assert costs["us-api-0"] == pytest.approx(1100 * 0.2 / 1e6)
    # hourly: amortised over predicted duration; a loaded endpoint costs more per request
    _, ann2 = scores(
        "cost", states={"eu-h100-0": state(running=60.0)}, names=("eu-h100-0", "eu-h100-1")
    )
    assert ann2["eu-h100-0"]["cost_usd"] > ann2["eu-h100-1"]["cost_usd"]


def test_cost_prefers_reserved_by_burst_factor() -> None:
    fl = fleet(
        sub("r", cost={"hourly_usd": 3.0}), sub("b", capacity="burst", cost={"hourly_usd": 2.6})
    )
    v1, _ = scores("cost", fl=fl, names=("r-0", "b-0"))
    assert v1 == {"r-0": 1.0, "b-0": 0.0}
    v2, _ = scores("cost", fl=fl, names=("r-0", "b-0"), burst_factor=1.0)
    assert v2 == {"r-0": 0.0, "b-0": 1.0}


def test_locality() -> None:
    vals, ann = scores("locality", {"client_region": "eu-west"}, names=("eu-h100-0", "us-h100-0"))
    assert vals["eu-h100-0"] == 1.0
    assert vals["us-h100-0"] == pytest.approx((1 - 0.08 / 0.2 + 0.0 + 1.0) / 3)
    assert ann["us-h100-0"]["rtt_s"] == pytest.approx(0.08)
    assert ann["us-h100-0"]["egress_usd"] > 0 and ann["eu-h100-0"]["egress_usd"] == 0
    # data in the US pulls toward the US
    vals2, _ = scores(
        "locality",
        {"client_region": "eu-west", "data_region": "us-east"},
        names=("eu-h100-0", "us-h100-0"),
        rtt_weight=0.0,
    )
    assert vals2["us-h100-0"] > vals2["eu-h100-0"]
    # no client region: no RTT, no egress — everyone equal
    vals3, _ = scores("locality", names=("eu-h100-0", "us-h100-0"))
    assert vals3["eu-h100-0"] == vals3["us-h100-0"] == 1.0


def test_energy_only_for_energy_aware() -> None:
    vals, _ = scores("energy")
    assert set(vals.values()) == {1.0}
    vals, ann = scores("energy", {"energy_aware": True}, names=("eu-h100-0", "eu-a100-0"))
    j = {n: ann[n]["joules_per_token"] for n in vals}
    assert j["eu-h100-0"] != j["eu-a100-0"]
    assert vals[min(j, key=lambda n: j[n])] == 1.0 and vals[max(j, key=lambda n: j[n])] == 0.0


# -- GIE and llm-d scorers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_name", "st", "expect"),
    [
        ("queue-scorer", ({"waiting": 0.0}, {"waiting": 0.0}), (1.0, 1.0)),
        ("queue-scorer", ({"waiting": 4.0}, {"waiting": 2.0}), (0.0, 1.0)),
        ("kv-cache-utilization-scorer", ({"kv_usage": 0.25}, {"kv_usage": 1.0}), (0.75, 0.0)),
        ("token-load-scorer", ({"inflight_tokens": 2_097_152}, {}), (0.5, 1.0)),
    ],
)
def test_baseline_scorers(
    type_name: str, st: tuple[dict[str, Any], dict[str, Any]], expect: tuple[float, float]
) -> None:
    vals, _ = scores(
        type_name,
        states={"eu-h100-0": state(**st[0]), "eu-h100-1": state(**st[1])},
        names=("eu-h100-0", "eu-h100-1"),
    )
    assert (vals["eu-h100-0"], vals["eu-h100-1"]) == pytest.approx(expect)


# -- baseline pickers ---------------------------------------------------------------------------


def _scored(snap: Any) -> list[Scored]:
    return [Scored(v, 0.0, {}) for v in snap.endpoints]


@pytest.mark.parametrize(
    ("loads", "held", "expect"),
    [
        ((100, 10, 10), {"a-0": 16}, {"a-1", "a-2"}),  # imbalanced: shortest queue
        ((20, 10, 10), {"a-0": 16}, {"a-0"}),  # balanced, cache hit > 0.3
        ((20, 10, 10), {"a-0": 4, "a-1": 1}, {"a-2"}),  # below threshold: smallest tree
        ((20, 10, 12), {"a-0": 4}, {"a-1"}),  # smallest trees tie: least load
    ],
)
def test_sglang_cache_aware(loads: tuple[int, ...], held: dict[str, int], expect: set[str]) -> None:
    fl = fleet(sub("a", n=3))
    snap = snapshot(fl, {f"a-{i}": state(inflight=x) for i, x in enumerate(loads)})
    p = plugin("sglang-cache-aware")
    for name, n in held.items():
        p.matcher.index.record(name, HASHES[:n])
    got = p.pick(cycle(profile(block_hashes=HASHES), snap), _scored(snap)).view.name
    assert got in expect


@pytest.mark.parametrize(
    ("held", "inflight_tokens", "expect", "costs"),
    [
        # cost = 1.0 × (16 - overlap) + ceil(in-flight tokens ÷ 64)
        ({"a-0": 8}, (0, 0, 0), {"a-0"}, (8, 16, 16)),
        ({"a-0": 8}, (640, 0, 0), {"a-1", "a-2"}, (18, 16, 16)),
        ({"a-0": 16, "a-1": 8}, (640, 0, 64 * 20), {"a-1"}, (10, 8, 36)),
    ],
)
def test_dynamo_kv_cost(
    held: dict[str, int],
    inflight_tokens: tuple[int, ...],
    expect: set[str],
    costs: tuple[int, ...],
) -> None:
    fl = fleet(sub("a", n=3))
    idx = PrefixIndex()
    for name in ("a-0", "a-1", "a-2"):
        idx.block_stored(name, HASHES[: held.get(name, 0)])
    states = {f"a-{i}": state(inflight=1, inflight_tokens=t) for i, t in enumerate(inflight_tokens)}
    snap = snapshot(fl, states, prefix_index=idx)
    cyc = cycle(profile(prompt_tokens=1024, block_hashes=HASHES), snap)
    got = plugin("dynamo-kv").pick(cyc, _scored(snap)).view.name
    assert got in expect
    assert tuple(cyc.annotations[f"a-{i}"]["dynamo_cost"] for i in range(3)) == costs


def test_dynamo_kv_temperature_samples() -> None:
    fl = fleet(sub("a", n=3))
    snap = snapshot(fl)
    p = plugin("dynamo-kv", temperature=1.0)
    got = {p.pick(cycle(profile(), snap, seed=s), _scored(snap)).view.name for s in range(30)}
    assert len(got) > 1


@pytest.mark.parametrize(
    ("mode", "expect"),
    [("fastest", "a-1"), ("score", "a-0")],  # a-1 predicted faster; a-0 has the higher total
)
def test_slo_first_when_none_meets(mode: str, expect: str) -> None:
    fl = fleet(sub("a", n=2))
    snap = snapshot(fl)
    cyc = cycle(profile(), snap)
    for name, ttft in (("a-0", 5.0), ("a-1", 3.0)):
        cyc.annotate(name, "meets_slo", 0.0)
        cyc.annotate(name, "ttft_s", ttft)
    scored = [Scored(snap.by_name["a-0"], 0.9, {}), Scored(snap.by_name["a-1"], 0.2, {})]
    p = plugin("slo-first", when_none_meets=mode)
    assert p.pick(cyc, scored).view.name == expect
    assert "no candidate predicted to meet the SLO" in cyc.notes[0]


def test_blocks_sent_moments_ago_count_until_their_kv_events_arrive() -> None:
    """With KV events, a request that shares a prefix with one sent to an endpoint within
    ``pending_s`` (blocks being computed there, not yet announced) matches that endpoint; later
    only the precise index counts."""
    fl = fleet(sub("a", n=2))
    idx = PrefixIndex()
    for name in ("a-0", "a-1"):
        idx.all_cleared(name)  # covered by KV events, holding nothing yet
    scorer = plugin("prefix-affinity", pending_s=5.0)
    first = profile(block_hashes=tuple(range(1, 9)))
    snap0 = snapshot(fl, now=100.0, prefix_index=idx)
    c0 = cycle(first, snap0)
    assert list(scorer.score(c0, views(snap0))) == [0.0, 0.0]
    scorer.on_picked(c0, snap0.by_name["a-1"])
    # a follow-up shares the first 6 blocks
    follow = profile(block_hashes=(*range(1, 7), 70, 80))
    snap1 = snapshot(fl, now=103.0, prefix_index=idx)
    assert list(scorer.score(cycle(follow, snap1), views(snap1))) == [0.0, 0.75]
    snap2 = snapshot(fl, now=106.0, prefix_index=idx)  # past pending_s, and no event came
    assert list(scorer.score(cycle(follow, snap2), views(snap2))) == [0.0, 0.0]
    off = plugin("prefix-affinity", pending_s=0.0)
    off.on_picked(c0, snap0.by_name["a-1"])
    assert list(off.score(cycle(follow, snap1), views(snap1))) == [0.0, 0.0]


# (endpoint, meets_slo, cost_usd, egress_usd, total) on r-0, r-1 (reserved gpu), b-0 (burst gpu),
# l-0 (reserved low-latency)
_SLO_FIRST = {
    "r-0": (1.0, 1.00, 0.00, 0.5),
    "r-1": (1.0, 1.05, 0.00, 0.7),
    "b-0": (1.0, 0.50, 0.00, 0.9),
    "l-0": (1.0, 1.50, 0.00, 0.8),
}


@pytest.mark.parametrize(
    ("case", "params", "kinds", "over", "expect"),
    [
        # reserved before burst; costs within 10 % tie, the higher total wins
        ("reserved first", {}, None, {}, "r-1"),
        ("no reserved preference", {"prefer_reserved": False}, None, {}, "b-0"),
        ("outside the cost tolerance", {"cost_tolerance": 0.01}, None, {}, "r-0"),
        # egress counts unless include_egress is off
        ("egress", {}, None, {"r-1": (1.0, 1.05, 0.50, 0.7)}, "r-0"),
        ("egress off", {"include_egress": False}, None, {"r-1": (1.0, 1.05, 0.50, 0.7)}, "r-1"),
        # only SLO-meeters; the burst one is the only one left
        ("SLO first", {}, None, {"r-0": (0.0, 1.0, 0.0, 0.5), "r-1": (0.0, 1.0, 0.0, 0.7),
                                  "l-0": (0.0, 1.5, 0.0, 0.8)}, "b-0"),
        # the class's preferred kinds win among meeters, whatever their cost unless capped
        ("preferred kind", {}, frozenset({"low-latency"}), {}, "l-0"),
        ("preferred kind too dear", {"preferred_kind_max_cost_ratio": 2.0},
         frozenset({"low-latency"}), {}, "r-1"),
        ("preferred kind within the cap", {"preferred_kind_max_cost_ratio": 3.0},
         frozenset({"low-latency"}), {}, "l-0"),
        ("preferred kind misses the SLO", {}, frozenset({"low-latency"}),
         {"l-0": (0.0, 1.5, 0.0, 0.8)}, "r-1"),
    ],
)
def test_slo_first_among_slo_meeters(
    case: str, params: dict[str, Any], kinds: frozenset[str] | None,
    over: dict[str, tuple[float, float, float, float]], expect: str,
) -> None:
    fl = fleet(sub("r", n=2), sub("b", capacity="burst"), sub("l", kind="low-latency"))
    snap = snapshot(fl)
    cyc = cycle(profile(preferred_kinds=kinds), snap)
    scored = []
    for name, (meets, cost, egress, total) in {**_SLO_FIRST, **over}.items():
        cyc.annotate(name, "meets_slo", meets)
        cyc.annotate(name, "cost_usd", cost)
        cyc.annotate(name, "egress_usd", egress)
        scored.append(Scored(snap.by_name[name], total, {}))
    assert plugin("slo-first", **params).pick(cyc, scored).view.name == expect, case
    assert bool(cyc.notes) == (expect == "l-0"), cyc.notes  # "class prefers …"


def test_predicted_latency_decode_step_is_the_rooflines() -> None:
    """`kept_load_terms` computes the request's decode step inline (`Roofline.step_time_s(0, 0,
    batch + 1, kv + ctx)` in the same operations): the same float, to the bit, on every kind of
    hardware of the fleet, for idle, busy, engine-reported and queued states."""
    fl = Fleet.from_config(hetero())
    lat = plugin("predicted-latency")
    rng = random.Random(7)
    checked = 0
    for _ in range(300):
        ep = rng.choice(fl.endpoints)
        r = ep.roofline(MODEL)
        if r is None:
            continue
        inflight = rng.choice([0, 0, 1, 3, 17, 64, 300])
        pending = rng.randrange(0, inflight + 1)
        s = state(
            inflight=inflight,
            inflight_tokens=inflight * rng.randrange(1, 9000),
            pending_prefill=pending,
            pending_prefill_tokens=pending * rng.randrange(0, 4000),
            running=rng.choice([None, 0.0, 5.0, 48.0, 250.0]),
            waiting=rng.choice([None, 0.0, 3.0, 40.0]),
            stale=rng.random() < 0.3,
        )
        idle_ctx = float(rng.randrange(1, 40000))
        k = lat._constants(ep, MODEL)
        batch, kv, _, raw_i = kept_load_terms(ep, s, k, idle_ctx, {})
        ctx = s.inflight_tokens / inflight if inflight > 0 else idle_ctx
        want = 0.0 if k.embedding else r.step_time_s(0, 0, batch + 1, kv + int(ctx))
        assert raw_i == want and math.copysign(1.0, raw_i) == math.copysign(1.0, want)
        checked += 1
    assert checked > 100


def test_predicted_latency_decode_step_charges_a_calibrated_context_cost(tmp_path: Path) -> None:
    """The inline decode step adds a calibrated profile's ``context_token_s`` per cached token
    of the step, as `Roofline.step_time_s` does: the same float, to the bit."""
    hw = dataclasses.replace(get_hardware("cpu"), name="cpu-ctx", seq_overhead_s=4e-5,
                             context_token_s=1.3e-7, step_overhead_s=2e-3)
    path = tmp_path / "cpu-ctx.yaml"
    path.write_text(dump_profile(Calibration(hardware=hw, prefill=(), decode=()), "cpu", {}))
    fl = Fleet.from_config(parse_config(to_yaml(pool_fleet(
        9, hardware_profiles=[str(path)],
        substrate={"name": "c", "kind": "cpu", "hardware": "cpu-ctx", "region": "eu-west",
                   "cost": {"hourly_usd": 1}},
        endpoint_fields={"name": "c-0"},
        models=[model("tiny-llama", None, 2048, precision="fp32")]))))
    ep = fl.endpoints[0]
    r = ep.roofline("tiny-llama")
    assert r is not None and r.hardware.context_token_s == 1.3e-7
    lat = plugin("predicted-latency")
    rng = random.Random(5)
    for _ in range(100):
        inflight = rng.choice([0, 1, 2, 4])
        s = state(inflight=inflight, inflight_tokens=inflight * rng.randrange(1, 1000),
                  running=rng.choice([None, 1.0, 4.0]))
        idle_ctx = float(rng.randrange(1, 2000))
        k = lat._constants(ep, "tiny-llama")
        batch, kv, _, raw_i = kept_load_terms(ep, s, k, idle_ctx, {})
        ctx = s.inflight_tokens / inflight if inflight > 0 else idle_ctx
        assert raw_i == r.step_time_s(0, 0, batch + 1, kv + int(ctx))
        assert raw_i > dataclasses.replace(r.hardware, context_token_s=0.0).step_overhead_s
