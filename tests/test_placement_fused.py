"""The fused scoring pass (`inferplane.placement.fused`) decides exactly as the reference path.

Two copies of the shipped policies are built from one config — one with ``fused`` scoring, one
without — and driven through the same sequence of random snapshots and requests (the picks
feed each copy's learned state: prefix indexes, sessions, ITL averages). Every decision's
evidence must be equal: the pick, every candidate's record (scores, totals, annotations and
their key order, with exact float reprs), removed_by, the predicted envelope, spillover and
notes.
"""

from __future__ import annotations

import json
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferplane.config.loader import parse_config
from inferplane.fleet.model import Fleet
from inferplane.fleet.prefix_index import PrefixIndex
from inferplane.fleet.state import EndpointState, FleetSnapshot
from inferplane.placement.build import build_policies
from inferplane.placement.framework import Decision, place
from inferplane.placement.fused import FusedScoring
from inferplane.placement.profile import RequestProfile
from tests.placement_helpers import config, profile, snapshot, sub
from tests.test_placement_properties import HASH_POOL, fleets, profiles

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

states = st.builds(
    EndpointState,
    healthy=st.sampled_from([True, True, True, False]),
    ejected=st.sampled_from([False, False, False, True]),
    stale=st.booleans(),
    running=st.none() | st.floats(0, 300),
    waiting=st.none() | st.floats(0, 500),
    kv_usage=st.none() | st.floats(0, 1),
    block_size=st.none() | st.sampled_from([16, 32]),
    num_gpu_blocks=st.none() | st.integers(1, 100_000),
    inflight=st.integers(0, 300),
    inflight_tokens=st.integers(0, 2_000_000),
    pending_prefill=st.integers(0, 20),
    pending_prefill_tokens=st.integers(0, 50_000),
    ttft_p50_s=st.none() | st.floats(0.001, 30),
    itl_p50_s=st.none() | st.floats(0.0001, 1),
    error_rate=st.sampled_from([0.0, 0.0, 0.1, 0.5, 0.99]),
    ttft_ratio_p50=st.none() | st.floats(0.1, 10),
    requests_left=st.none() | st.integers(0, 3),
    tokens_left=st.none() | st.integers(0, 10_000),
)


@st.composite
def scenario(draw: st.DrawFn) -> tuple[Any, list[FleetSnapshot]]:
    """A fleet and a few snapshots of it (the load moving between decisions)."""
    fl = draw(fleets())
    snaps = []
    index = None
    if draw(st.booleans()):
        index = PrefixIndex()
        for e in fl.endpoints:
            if draw(st.booleans()):
                index.block_stored(e.name, draw(st.lists(st.sampled_from(HASH_POOL))))
    for version in range(draw(st.integers(1, 3))):
        states_ = {e.name: draw(states) for e in fl.endpoints}
        snap = snapshot(fl, states_, now=float(version), prefix_index=index)
        snaps.append(snap)
    return fl, snaps


def evidence(d: Decision) -> str:
    lines = [
        f"{d.endpoint} {d.removed_by!r} {d.predicted!r} {d.spillover!r} {d.notes!r} "
        f"{d.snapshot_version}"
    ]
    for c in d.candidates:
        lines.append(
            f"{c.endpoint} {c.substrate} {c.rejected_by} {c.reason!r} {c.total!r} "
            f"{list(c.scores.items())!r} {list(c.annotations.items())!r}"
        )
    return "\n".join(lines)


def with_engine_hashes(p: RequestProfile, engine: bool) -> RequestProfile:
    return p.with_(engine_block_hashes=p.block_hashes if engine else ())


BASE = config(sub("base"))


def test_the_default_profile_is_fused_and_the_others_are_not() -> None:
    fused = build_policies(BASE, "<test>")
    assert fused["default"].fused is not None
    assert all(p.fused is None for n, p in fused.items() if n != "default")
    assert all(p.fused is None for p in build_policies(BASE, "<test>", fused=False).values())


def test_a_room_weight_keeps_the_reference_path() -> None:
    raw = {
        "regions": [],
        "substrates": [sub("a")],
        "plugins": [{"type": "prefix-affinity", "parameters": {"room_weight": 0.5}}],
    }
    pols = build_policies(parse_config(json.dumps(raw), "<t>"), "<t>")
    assert FusedScoring.compile(pols["default"]) is None
    assert pols["default"].fused is None


@SETTINGS
@given(
    sc=scenario(),
    profs=st.lists(st.tuples(profiles, st.booleans()), min_size=1, max_size=6),
    seed=st.integers(0, 9),
)
def test_fused_and_reference_decisions_are_equal(
    sc: tuple[Any, list[FleetSnapshot]], profs: list[tuple[RequestProfile, bool]], seed: int
) -> None:
    _, snaps = sc
    fused = build_policies(BASE, "<test>", seed=seed)["default"]
    ref = build_policies(BASE, "<test>", seed=seed, fused=False)["default"]
    assert fused.fused is not None and ref.fused is None
    for i, (prof, engine) in enumerate(profs):
        p = with_engine_hashes(prof, engine)
        snap = snaps[i % len(snaps)]
        a = place(p, snap, fused, decision_id=str(i))
        b = place(p, snap, ref, decision_id=str(i))
        assert evidence(a) == evidence(b)


def test_a_busy_fleet_decides_the_same_over_many_requests() -> None:
    """A fixed fleet under moving load, energy-aware and data-region requests, sessions and
    shared prefixes: a long sequence whose learned state diverges if any pick differs."""
    cfg = config(
        sub("eu", n=3),
        sub("eu-b", hardware="a100", capacity="burst", cost={"hourly_usd": 3.4}),
        sub("us", n=2, region="us-east", jurisdiction="us", cost={"hourly_usd": 2.5}),
        sub(
            "api",
            kind="provider-api",
            hardware="provider-api",
            region="us-east",
            jurisdiction="us",
            capacity="burst",
            cost={"input_per_mtok": 0.2, "output_per_mtok": 0.4},
        ),
    )
    fl = Fleet.from_config(cfg)
    fused = build_policies(cfg, "<test>")["default"]
    ref = build_policies(cfg, "<test>", fused=False)["default"]
    rng = random.Random(7)
    for i in range(150):
        states_ = {
            e.name: EndpointState(
                stale=rng.random() < 0.2,
                running=float(rng.randrange(0, 60)),
                waiting=float(rng.choice([0, 0, 2, 9])),
                kv_usage=rng.random(),
                inflight=rng.randrange(0, 70),
                inflight_tokens=rng.randrange(0, 200_000),
                pending_prefill=rng.randrange(0, 3),
                pending_prefill_tokens=rng.randrange(0, 9000),
                itl_p50_s=rng.choice([None, 0.02, 0.04]),
                ttft_ratio_p50=rng.choice([None, 0.8, 1.3]),
                error_rate=rng.choice([0.0, 0.0, 0.2]),
            )
            for e in fl.endpoints
        }
        snap = snapshot(fl, states_, now=float(i))
        hashes = tuple(rng.sample(range(8), 2) + [rng.randrange(1000) for _ in range(3)])
        p = profile(
            request_id=f"r{i}",
            prompt_tokens=rng.randrange(1, 6000),
            max_output_tokens=rng.randrange(1, 900),
            block_hashes=hashes,
            session_id=rng.choice([None, "a", "b", "c"]),
            client_region=rng.choice([None, "eu-west", "us-east"]),
            data_region=rng.choice([None, None, "us-east"]),
            energy_aware=rng.random() < 0.2,
            ttft_slo_s=rng.choice([None, 0.2, 1.0]),
            itl_slo_s=rng.choice([None, 0.03, 0.1]),
        )
        a = place(p, snap, fused, decision_id=str(i))
        b = place(p, snap, ref, decision_id=str(i))
        assert evidence(a) == evidence(b), i
