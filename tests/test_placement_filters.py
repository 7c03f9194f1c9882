"""Table-driven tests of the constraint filters and the prefix-affinity filter."""

from __future__ import annotations

from typing import Any

import pytest

from inferplane.fleet.model import Fleet
from inferplane.fleet.prefix_index import PrefixIndex
from inferplane.placement.plugins.constraints import SATURATED_KEY
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
ALL_8B = [
    "eu-h100-0",
    "eu-h100-1",
    "eu-a100-0",
    "de-sov-0",
    "us-h100-0",
    "us-groq-0",
    "us-api-0",
]


def run_filter(
    type_name: str, prof_kw: dict[str, Any], states: dict[str, Any] | None = None, **params: Any
) -> tuple[list[str], dict[str, str], dict[str, Any]]:
    snap = snapshot(FLEET, states)
    cyc = cycle(profile(**prof_kw), snap)
    res = plugin(type_name, **params).filter(cyc, views(snap, *ALL_8B))
    kept = [v.name for v in res.kept]
    assert set(kept) | set(res.rejected) == set(ALL_8B)
    assert not set(kept) & set(res.rejected)
    return kept, res.rejected, cyc.data


@pytest.mark.parametrize(
    ("allowed", "kept"),
    [
        (None, ALL_8B),
        (frozenset({"eu"}), ["eu-h100-0", "eu-h100-1", "eu-a100-0"]),
        (frozenset({"eu-sovereign"}), ["de-sov-0"]),
        (frozenset({"us", "eu-sovereign"}), ["de-sov-0", "us-h100-0", "us-groq-0", "us-api-0"]),
        (frozenset({"cn"}), []),
        (frozenset(), []),
    ],
)
def test_jurisdiction(allowed: frozenset[str] | None, kept: list[str]) -> None:
    got, rejected, _ = run_filter("jurisdiction", {"allowed_jurisdictions": allowed})
    assert got == kept
    for reason in rejected.values():
        assert reason.startswith("jurisdiction ")


@pytest.mark.parametrize(
    ("precisions", "kept"),
    [
        (None, ALL_8B),
        (frozenset({"fp8"}), ["us-api-0"]),
        (frozenset({"bf16"}), [n for n in ALL_8B if n != "us-api-0"]),
        (frozenset({"int4"}), []),
    ],
)
def test_precision(precisions: frozenset[str] | None, kept: list[str]) -> None:
    got, rejected, _ = run_filter("precision", {"precisions": precisions})
    assert got == kept
    assert all("tolerated" in r for r in rejected.values())


@pytest.mark.parametrize(
    ("kw", "kept"),
    [
        ({}, ALL_8B),
        ({"allow_burst": False}, ["eu-h100-0", "eu-h100-1", "de-sov-0", "us-h100-0"]),
        (
            {"allowed_kinds": frozenset({"gpu", "low-latency"})},
            [n for n in ALL_8B if n != "us-api-0"],
        ),
        (
            {"allow_burst": False, "allowed_kinds": frozenset({"provider-api"})},
            [],
        ),
    ],
)
def test_capacity_class(kw: dict[str, Any], kept: list[str]) -> None:
    got, rejected, _ = run_filter("capacity-class", kw)
    assert got == kept
    for name, reason in rejected.items():
        assert "burst" in reason or "kind" in reason, name


@pytest.mark.parametrize(
    ("priority", "st", "removed"),
    [
        # standard priority is never shed, however loaded
        ("standard", {"inflight": 64}, False),
        ("batch", {"inflight": 63}, False),
        ("batch", {"inflight": 64}, True),  # at the concurrency envelope (64)
        ("sheddable", {"waiting": 6.0}, True),
        ("sheddable", {"waiting": 5.0}, False),
        ("batch", {"kv_usage": 0.81}, True),
        ("batch", {"kv_usage": 0.81, "stale": True}, False),  # stale engine signals ignored
        ("batch", {"waiting": 50.0, "stale": True}, False),
    ],
)
def test_saturation(priority: str, st: dict[str, Any], removed: bool) -> None:
    got, rejected, data = run_filter(
        "saturation", {"priority": priority}, {"eu-h100-0": state(**st)}
    )
    assert ("eu-h100-0" not in got) is removed
    assert set(rejected) == ({"eu-h100-0"} if removed else set())
    if removed:
        assert rejected["eu-h100-0"].startswith("saturated: ")
        assert [v.name for v in data[SATURATED_KEY]] == ["eu-h100-0"]
    else:
        assert SATURATED_KEY not in data


def test_saturation_parameters() -> None:
    got, _, _ = run_filter(
        "saturation",
        {"priority": "standard"},
        {"eu-h100-0": state(inflight=40)},
        priorities=["standard"],
        inflight_fraction=0.5,
    )
    assert "eu-h100-0" not in got


@pytest.mark.parametrize(
    ("variant", "kept"),
    [(None, ["a-0", "b-0"]), ("instruct", ["b-0"]), ("base", [])],
)
def test_model_variant_is_covered_by_model_served(variant: str | None, kept: list[str]) -> None:
    fl = fleet(
        sub("a"),
        sub("b", models=[{"name": MODEL, "variant": "instruct", "max_context": 8192}]),
    )
    snap = snapshot(fl)
    res = plugin("model-served").filter(cycle(profile(variant=variant), snap), views(snap))
    assert [v.name for v in res.kept] == kept


# -- llm-d prefix-cache-affinity filter ---------------------------------------------------------

HASHES = tuple(range(100, 110))


@pytest.mark.parametrize(
    ("held", "inflight", "kept"),
    [
        ({}, {}, ["a-0", "a-1", "a-2"]),  # nobody sticky: keep all
        ({"a-0": 10}, {}, ["a-0"]),  # a-0 holds 100 %
        ({"a-0": 8, "a-1": 7}, {}, ["a-0"]),  # 0.8 sticks, 0.7 does not
        ({"a-0": 10, "a-1": 10, "a-2": 9}, {}, ["a-0", "a-1", "a-2"]),  # all sticky
        # sticky endpoint 20 s of prefill behind the idle one (> 18 s penalty): release
        ({"a-0": 10}, {"a-0": 20 * 15928}, ["a-0", "a-1", "a-2"]),
        ({"a-0": 10}, {"a-0": 10 * 15928}, ["a-0"]),
    ],
)
def test_prefix_cache_affinity_filter(
    held: dict[str, int], inflight: dict[str, int], kept: list[str]
) -> None:
    fl = fleet(sub("a", n=3))
    idx = PrefixIndex()
    for name in ("a-0", "a-1", "a-2"):
        idx.block_stored(name, HASHES[: held.get(name, 0)])
    snap = snapshot(
        fl,
        {n: state(inflight=1, inflight_tokens=t) for n, t in inflight.items()},
        prefix_index=idx,
    )
    res = plugin("prefix-cache-affinity").filter(
        cycle(profile(block_hashes=HASHES), snap), views(snap)
    )
    assert [v.name for v in res.kept] == kept
    for reason in res.rejected.values():
        assert "prefix score" in reason


@pytest.mark.parametrize(
    ("st", "removed", "reason"),
    [
        ({}, False, ""),  # no declared limit
        ({"requests_left": 1, "tokens_left": 10_000}, False, ""),
        ({"requests_left": 0}, True, "requests/min used"),
        ({"requests_left": 5, "tokens_left": 99}, True, "tokens/min left, needs 150"),
        ({"tokens_left": 150}, False, ""),
    ],
)
def test_rate_limit(st: dict[str, Any], removed: bool, reason: str) -> None:
    got, rejected, data = run_filter(
        "rate-limit", {"prompt_tokens": 100, "max_output_tokens": 50}, {"us-api-0": state(**st)}
    )
    assert ("us-api-0" not in got) is removed
    if removed:
        assert rejected["us-api-0"].startswith("rate limit: ") and reason in rejected["us-api-0"]
        assert [v.name for v in data[SATURATED_KEY]] == ["us-api-0"]
    else:
        assert not rejected


@pytest.mark.parametrize("seed", range(4))
def test_reserved_capacity_corrects_its_sums_from_the_live_fleets_log(seed: int) -> None:
    """With a live fleet's snapshots, reserved-capacity's in-flight sum per reserved substrate
    is corrected where the snapshot log says a view changed (not summed over every endpoint of
    every candidate substrate: 2,000 reads a decision at 2,000 endpoints) and equals the sum over
    the snapshot's views, through reservations, releases, full refreshes, snapshots it does not
    read, and more of them than the log holds."""
    import random

    from inferplane.fleet.live import LiveFleet

    rng = random.Random(seed)
    f = fleet(sub("ra", n=6, max_concurrency=3), sub("rb", n=5, max_concurrency=2),
              sub("bu", n=3, capacity="burst"))
    t = [1000.0]
    live = LiveFleet(f, clock=lambda: t[0])
    rc = plugin("reserved-capacity")
    names = [e.name for e in f.endpoints]
    held: list[Any] = []
    prof = profile()
    followed = 0
    for _ in range(300):
        for _ in range(rng.choice([0, 0, 0, 1, 3, 70])):  # snapshots it does not read
            held.append(live.reserve(rng.choice(names), 10))
            live.snapshot()
        for _ in range(rng.randint(0, 3)):
            if held and rng.random() < 0.5:
                held.pop(rng.randrange(len(held))).release()
            else:
                held.append(live.reserve(rng.choice(names), 10))
        t[0] += rng.choice([0.0, 0.01, 0.06])
        snap = live.snapshot()
        counted = rc._counted
        rc.filter(cycle(prof, snap), list(snap.endpoints))
        followed += rc._counted is counted
        assert rc._serial == snap.serial
        for s in ("ra", "rb"):
            assert rc._used[s] == sum(
                v.state.inflight for v in snap.endpoints if v.endpoint.substrate.name == s)
    assert followed > 200
