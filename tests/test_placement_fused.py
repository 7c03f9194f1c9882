"""The fused scoring pass (`inferplane.placement.fused`) decides exactly as the reference path.

Two copies of the shipped policies are built from one config — one with ``fused`` scoring, one
without — and driven through the same sequence of random snapshots and requests (the picks
feed each copy's learned state: prefix indexes, sessions, ITL averages). Every decision's
evidence must be equal: the pick, every candidate's record (scores, totals, annotations and
their key order, with exact float reprs), removed_by, the predicted envelope, spillover and
notes.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferplane.config.loader import parse_config
from inferplane.fleet.model import Fleet
from inferplane.fleet.prefix_index import PrefixIndex
from inferplane.fleet.state import EndpointState, FleetSnapshot
from inferplane.physics import get_hardware
from inferplane.physics.calibration import Calibration, dump_profile
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


# -- the fused filter pass ---------------------------------------------------------------------

def _filter_fleet() -> Any:
    """Endpoints that every default filter has a reason to remove: variants, an Anthropic
    dialect, a burst pool, other kinds and jurisdictions, small contexts, declared rate limits,
    failure domains and zones, a small committed concurrency."""
    models = [{"name": "llama-3.1-8b", "max_context": 8192, "variant": "fast"},
              {"name": "qwen3-32b", "max_context": 32768, "precision": "fp8"}]
    subs = [
        sub("eu", n=3, models=models, max_concurrency=8),
        sub("eu-b", capacity="burst", hardware="a100", cost={"hourly_usd": 3.4}),
        sub("us", n=2, region="us-east", jurisdiction="us", cost={"hourly_usd": 2.5},
            models=[{"name": "llama-3.1-8b", "max_context": 2048}]),
        sub("api", kind="provider-api", hardware="provider-api", region="us-east",
            jurisdiction="us", capacity="burst",
            cost={"input_per_mtok": 0.2, "output_per_mtok": 0.4}),
        sub("lpu", kind="low-latency", hardware="groq-lpu", region="us-east", jurisdiction="us"),
    ]
    subs[0]["failure_domain"], subs[0]["zone"] = "rack-1", "eu-west-1a"
    subs[0]["committed_concurrency"] = 3
    subs[1]["zone"] = "eu-west-1a"
    subs[2]["failure_domain"], subs[2]["zone"] = "rack-9", "us-east-1a"
    subs[3]["endpoints"][0]["dialect"] = "anthropic"
    subs[3]["endpoints"][0]["limits"] = {"requests_per_min": 5, "tokens_per_min": 9000}
    return config(*subs)


FILTER_CFG = _filter_fleet()
FILTER_FLEET = Fleet.from_config(FILTER_CFG)
request_overlays = st.fixed_dictionaries({
    "api": st.sampled_from(["chat", "chat", "completions", "embeddings"]),
    "variant": st.sampled_from([None, None, "fast", "default"]),
    "workload_class": st.sampled_from(["interactive", "batch"]),
    "avoid_domains": st.frozensets(st.sampled_from(
        ["fd:rack-1", "fd:rack-9", "zone:eu-west-1a", "zone:us-east-1a"])),
    "excluded": st.frozensets(st.sampled_from([e.name for e in FILTER_FLEET.endpoints]),
                              max_size=2),
})


@SETTINGS
@given(
    states_=st.lists(states, min_size=len(FILTER_FLEET.endpoints),
                     max_size=len(FILTER_FLEET.endpoints)),
    profs=st.lists(st.tuples(profiles, request_overlays), min_size=1, max_size=5),
)
def test_the_fused_filters_remove_what_the_filters_in_turn_remove(
    states_: list[EndpointState], profs: list[tuple[RequestProfile, dict[str, Any]]]
) -> None:
    fused = build_policies(FILTER_CFG, "<test>")["default"]
    ref = build_policies(FILTER_CFG, "<test>", fused=False)["default"]
    assert fused.fused_filters is not None and ref.fused_filters is None
    snap = snapshot(FILTER_FLEET, {e.name: s for e, s in
                                   zip(FILTER_FLEET.endpoints, states_, strict=True)})
    for i, (prof, over) in enumerate(profs):
        p = prof.with_(**over)
        a = place(p, snap, fused, decision_id=str(i))
        b = place(p, snap, ref, decision_id=str(i))
        assert evidence(a) == evidence(b)


def test_only_the_default_filter_list_is_fused() -> None:
    pols = build_policies(BASE, "<test>")
    assert pols["default"].fused_filters is not None
    assert all(p.fused_filters is None for n, p in pols.items() if n != "default")


def test_prefix_affinity_reads_predicted_latencys_index_when_no_other_profile_uses_them() -> None:
    """One walk, one lesson per pick: the two plugins' indexes would be identical."""
    pol = build_policies(BASE, "<test>")["default"]
    latency, prefix = pol.scorers[0][0], pol.scorers[1][0]
    assert prefix.matcher is latency.matcher  # type: ignore[attr-defined]
    raw = {
        "regions": [],
        "substrates": [sub("a")],
        "profiles": [{"name": "also", "plugins": [{"ref": "model-served"},
                                                  {"ref": "prefix-affinity", "weight": 1}]}],
    }
    pol = build_policies(parse_config(json.dumps(raw), "<t>"), "<t>")["default"]
    latency, prefix = pol.scorers[0][0], pol.scorers[1][0]
    assert pol.fused is not None
    assert prefix.matcher is not latency.matcher  # type: ignore[attr-defined]


def test_a_reloaded_fleet_is_filtered_and_scored_afresh() -> None:
    """The fused passes keep per-endpoint verdicts, rows and state terms: a new fleet (a
    reload: other endpoint objects at the same positions, other limits and hardware) must not
    be judged by the old one's."""
    before = Fleet.from_config(config(sub("eu", n=3, max_concurrency=8)))
    after = Fleet.from_config(config(sub("eu", n=3, hardware="a100", max_concurrency=200),
                                     sub("us", region="us-east", jurisdiction="us")))
    fused = build_policies(BASE, "<test>")["default"]
    ref = build_policies(BASE, "<test>", fused=False)["default"]
    busy = EndpointState(stale=False, running=20.0, waiting=2.0, kv_usage=0.5, inflight=6,
                         inflight_tokens=40_000)
    for i, fl in enumerate([before, after, before]):
        snap = snapshot(fl, {e.name: busy for e in fl.endpoints}, now=float(i))
        for j in range(3):
            p = profile(request_id=f"r{i}{j}", prompt_tokens=500 + 900 * j, max_output_tokens=200,
                        block_hashes=(1, 2, 3 + j), priority="batch" if j == 2 else "standard",
                        allowed_jurisdictions=frozenset({"eu"}) if j == 1 else None)
            a = place(p, snap, fused, decision_id=str(j))
            b = place(p, snap, ref, decision_id=str(j))
            assert evidence(a) == evidence(b), (i, j)


def test_every_default_filter_removes_something_in_the_fused_comparison() -> None:
    """A table of requests against one snapshot of the filter fleet in which each of the ten
    filters removes some endpoint: the fused pass must agree with the filters in turn on each
    (so the random comparison above is not vacuous about any of them)."""
    names = [e.name for e in FILTER_FLEET.endpoints]
    states_ = {n: EndpointState(stale=False, running=4.0, waiting=0.0, kv_usage=0.2)
               for n in names}
    states_["eu-0"] = EndpointState(stale=False, inflight=2, inflight_tokens=5000)
    states_["eu-1"] = EndpointState(stale=False, inflight=2, inflight_tokens=5000)
    states_["eu-b-0"] = EndpointState(healthy=False)
    states_["lpu-0"] = EndpointState(stale=False, kv_usage=0.95)  # saturated for batch
    states_["api-0"] = EndpointState(requests_left=0)
    snap = snapshot(FILTER_FLEET, states_)
    requests = [
        profile(model="qwen3-32b", precisions=frozenset({"bf16"})),  # model, precision
        profile(prompt_tokens=3000, max_output_tokens=100),  # context-window (us: 2048)
        profile(allowed_jurisdictions=frozenset({"eu"})),  # jurisdiction; reserved capacity
        profile(allow_burst=False, priority="batch"),  # capacity-class, saturation
        profile(avoid_domains=frozenset({"fd:rack-9"}), prompt_tokens=100,
                max_output_tokens=100),  # failure-domain
        profile(variant="fast"),
    ]
    fused = build_policies(FILTER_CFG, "<test>")["default"]
    ref = build_policies(FILTER_CFG, "<test>", fused=False)["default"]
    removed: set[str] = set()
    for i, p in enumerate(requests):
        a = place(p, snap, fused, decision_id=str(i))
        b = place(p, snap, ref, decision_id=str(i))
        assert evidence(a) == evidence(b), i
        removed |= set(a.removed_by)
    assert removed == {f.name for f in fused.filters}, removed


def test_a_calibrated_profile_decides_the_same(tmp_path: Path) -> None:
    """A calibrated profile's extra step terms (per sequence, per decode context token) and
    front end reach the fused pass as they reach the reference path."""
    base = get_hardware("cpu")
    hw = dataclasses.replace(base, name="cpu-cal", seq_overhead_s=5e-5, context_token_s=2e-7,
                             step_overhead_s=3e-3, request_overhead_s=2e-3,
                             frontend_request_s=4e-3, frontend_token_s=1e-4)
    path = tmp_path / "cpu-cal.yaml"
    path.write_text(dump_profile(Calibration(hardware=hw, prefill=(), decode=()), "cpu", {}))
    models = "[{name: tiny-llama, max_context: 2048, precision: fp32}]"
    cfg = parse_config(f"""hardware_profiles: [{path}]
substrates:
  - {{name: cal, kind: cpu, hardware: cpu-cal, region: eu-west, jurisdiction: eu,
     cost: {{hourly_usd: 1}},
     endpoints: [{{name: cal-0, url: "http://127.0.0.1:9", models: {models}}},
                 {{name: cal-1, url: "http://127.0.0.1:10", models: {models}}}]}}
  - {{name: tab, kind: cpu, hardware: cpu, region: eu-west, jurisdiction: eu,
     cost: {{hourly_usd: 1}},
     endpoints: [{{name: tab-0, url: "http://127.0.0.1:11", models: {models}}}]}}
""")
    fl = Fleet.from_config(cfg)
    fused = build_policies(cfg, "<test>")["default"]
    ref = build_policies(cfg, "<test>", fused=False)["default"]
    assert fused.fused is not None
    rng = random.Random(3)
    for i in range(60):
        states_ = {
            e.name: EndpointState(
                running=float(rng.randrange(0, 5)),
                inflight=rng.randrange(0, 5),
                inflight_tokens=rng.randrange(0, 4000),
                pending_prefill=rng.randrange(0, 3),
                pending_prefill_tokens=rng.randrange(0, 2000),
            )
            for e in fl.endpoints
        }
        snap = snapshot(fl, states_, now=float(i))
        p = profile(request_id=f"r{i}", model="tiny-llama",
                    prompt_tokens=rng.randrange(1, 1500), max_output_tokens=rng.randrange(1, 200),
                    ttft_slo_s=rng.choice([None, 0.02, 0.05]))
        a = place(p, snap, fused, decision_id=str(i))
        b = place(p, snap, ref, decision_id=str(i))
        assert evidence(a) == evidence(b), i
