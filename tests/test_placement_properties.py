"""Property tests: for random fleets, loads and requests, every shipped profile keeps the hard
constraints, and placement is deterministic for a given snapshot and seed."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferplane.config.loader import builtin_defaults
from inferplane.fleet.model import Fleet
from inferplane.fleet.prefix_index import PrefixIndex
from inferplane.fleet.state import EndpointState, FleetSnapshot
from inferplane.placement.framework import Decision, place
from inferplane.placement.profile import RequestProfile
from tests.placement_helpers import config, policies, snapshot, sub

SHIPPED = [p["name"] for p in builtin_defaults()["profiles"]]
BASE = config(sub("base"))  # policies depend on the plugins and profiles, not the fleet
JURISDICTIONS = ["eu", "us", "eu-sovereign", "cn"]
REGIONS = ["eu-west", "us-east"]
MODELS = ["llama-3.1-8b", "qwen3-32b"]
HARDWARE = [
    ("gpu", "h100"),
    ("gpu", "a100"),
    ("gpu", "l4"),
    ("low-latency", "groq-lpu"),
    ("giant-context", "cerebras-wse3"),
    ("provider-api", "provider-api"),
]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def substrates(draw: st.DrawFn, i: int) -> dict[str, Any]:
    kind, hw = draw(st.sampled_from(HARDWARE))
    models = draw(st.lists(st.sampled_from(MODELS), min_size=1, max_size=2, unique=True))
    per_token = draw(st.booleans())
    cost = (
        {"input_per_mtok": draw(st.floats(0, 2)), "output_per_mtok": draw(st.floats(0, 2))}
        if per_token
        else {"hourly_usd": draw(st.floats(0.5, 40))}
    )
    return sub(
        f"s{i}",
        n=draw(st.integers(1, 3)),
        kind=kind,
        hardware=hw,
        region=draw(st.sampled_from(REGIONS)),
        jurisdiction=draw(st.sampled_from(JURISDICTIONS)),
        capacity=draw(st.sampled_from(["reserved", "burst"])),
        cost=cost,
        models=[
            {
                "name": m,
                "max_context": draw(st.sampled_from([2048, 8192, 32768, 131072])),
                "precision": draw(st.sampled_from(["bf16", "fp8"])),
            }
            for m in models
        ],
        max_concurrency=draw(st.integers(1, 128)),
    )


@st.composite
def fleets(draw: st.DrawFn) -> Fleet:
    n = draw(st.integers(1, 6))
    return Fleet.from_config(config(*(draw(substrates(i)) for i in range(n))))


endpoint_states = st.builds(
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
    ttft_p50_s=st.none() | st.floats(0.001, 30),
    itl_p50_s=st.none() | st.floats(0.0001, 1),
)

HASH_POOL = list(range(40))

profiles = st.builds(
    RequestProfile,
    request_id=st.just("r"),
    tenant=st.just("t"),
    model=st.sampled_from([*MODELS, *MODELS, "unknown-model"]),
    priority=st.sampled_from(["critical", "standard", "sheddable", "batch"]),
    prompt_tokens=st.integers(0, 4000) | st.integers(0, 150_000),
    max_output_tokens=st.integers(0, 1024) | st.integers(0, 8192),
    block_hashes=st.lists(st.sampled_from(HASH_POOL), max_size=12).map(tuple),
    session_id=st.none() | st.sampled_from(["a", "b"]),
    ttft_slo_s=st.none() | st.floats(0.01, 20),
    itl_slo_s=st.none() | st.floats(0.001, 1),
    allowed_jurisdictions=st.none() | st.frozensets(st.sampled_from(JURISDICTIONS), max_size=3),
    precisions=st.none()
    | st.none()
    | st.frozensets(st.sampled_from(["bf16", "fp8", "int4"]), min_size=1),
    allowed_kinds=st.none()
    | st.none()
    | st.frozensets(st.sampled_from([k for k, _ in HARDWARE]), min_size=1),
    allow_burst=st.sampled_from([True, True, False]),
    energy_aware=st.booleans(),
    client_region=st.none() | st.sampled_from(REGIONS),
    data_region=st.none() | st.sampled_from(REGIONS),
)


@st.composite
def snapshots(draw: st.DrawFn) -> FleetSnapshot:
    fl = draw(fleets())
    states = {e.name: draw(endpoint_states) for e in fl.endpoints}
    index = None
    if draw(st.booleans()):
        index = PrefixIndex()
        for e in fl.endpoints:
            if draw(st.booleans()):
                index.block_stored(e.name, draw(st.lists(st.sampled_from(HASH_POOL))))
    return snapshot(fl, states, now=draw(st.floats(0, 1e6)), prefix_index=index)


def check(d: Decision, prof: RequestProfile, snap: FleetSnapshot) -> None:
    if d.picked is None:
        assert sum(d.removed_by.values()) == len(snap.endpoints)
        return
    ep = d.picked.endpoint
    if prof.allowed_jurisdictions is not None:
        assert ep.substrate.jurisdiction in prof.allowed_jurisdictions
    served = ep.models.get(prof.model)
    assert served is not None
    assert prof.prompt_tokens + prof.max_output_tokens <= served.max_context
    assert d.picked.state.healthy and not d.picked.state.ejected
    if prof.precisions is not None:
        assert served.precision in prof.precisions
    if not prof.allow_burst:
        assert ep.substrate.capacity_class == "reserved"
    if prof.allowed_kinds is not None:
        assert ep.substrate.kind in prof.allowed_kinds
    if d.spillover is not None:
        assert d.spillover.chosen == d.picked.name


@SETTINGS
@given(snap=snapshots(), profs=st.lists(profiles, min_size=1, max_size=4), seed=st.integers(0, 9))
def test_every_profile_keeps_the_hard_constraints(
    snap: FleetSnapshot, profs: list[RequestProfile], seed: int
) -> None:
    pols = policies(BASE, seed=seed)  # built-in plugins and profiles, fresh state
    for name in SHIPPED:
        for prof in profs:  # several in a row: learned state must not break constraints
            check(place(prof, snap, pols[name]), prof, snap)


@SETTINGS
@given(snap=snapshots(), profs=st.lists(profiles, min_size=1, max_size=4), seed=st.integers(0, 9))
def test_placement_is_deterministic_for_a_snapshot_and_seed(
    snap: FleetSnapshot, profs: list[RequestProfile], seed: int
) -> None:
    a, b = policies(BASE, seed=seed), policies(BASE, seed=seed)
    for name in SHIPPED:
        for prof in profs:
            da, db = place(prof, snap, a[name]), place(prof, snap, b[name])
            assert da.endpoint == db.endpoint
            assert da.spillover == db.spillover
            assert da.predicted == db.predicted
            assert da.removed_by == db.removed_by
