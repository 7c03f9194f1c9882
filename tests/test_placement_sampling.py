"""Candidate sampling for large fleets: a fleet larger than a profile's ``max_candidates`` is
sampled (prefix holders and the session's endpoint proposed, an equal random share of every
pool drawn), falls back to the whole fleet when nothing sampled is eligible, and a fleet at or
under the limit is evaluated exactly as before."""

from __future__ import annotations

import dataclasses

from inferplane.fleet.model import Fleet
from inferplane.fleet.prefix_index import PrefixIndex
from inferplane.placement.framework import Policy, place
from inferplane.placement.hashing import prompt_block_hashes
from tests.placement_helpers import MODEL, config, policies, profile, snapshot, state, sub

BASE = config(sub("base"))  # policies depend on the plugins and profiles, not the fleet


def big(n_pools: int = 8, per: int = 20) -> Fleet:
    subs = [sub(f"p{k}", n=per, cost={"hourly_usd": 3.0 + k}) for k in range(n_pools)]
    return Fleet.from_config(config(*subs))


def default(limit: int) -> Policy:
    pol = policies(BASE)["default"]
    pol.max_candidates = limit
    return pol


def test_a_large_fleet_is_sampled_from_every_pool() -> None:
    fl = big()
    pol = default(32)
    d = place(profile(), snapshot(fl), pol)
    assert d.picked is not None
    names = [c.endpoint for c in d.candidates]
    assert 32 <= len(names) < 160
    assert {n.split("-")[0] for n in names} == {f"p{k}" for k in range(8)}  # every pool
    assert f"sampled {len(names)} of 160 endpoints" in d.notes
    order = [fl.by_name[n].index for n in names]
    assert order == sorted(order)  # fleet order kept


def test_prefix_holders_and_the_session_endpoint_are_always_candidates() -> None:
    fl = big()
    pol = default(16)
    text = "shared system prompt " * 200
    hashes = prompt_block_hashes(MODEL, text)
    prof = profile(block_hashes=hashes, session_id="s1")
    snap = snapshot(fl)
    first = place(prof, snap, pol)
    assert first.picked is not None
    holder = first.picked.name
    for i in range(30):  # the holder stays in every sample: its prefix and session keep it
        d = place(dataclasses.replace(prof, request_id=f"r{i}"), snap, pol)
        assert holder in {c.endpoint for c in d.candidates}
        assert d.picked is not None and d.picked.name == holder


def test_precise_index_holders_are_proposed() -> None:
    fl = big()
    pol = default(16)
    idx = PrefixIndex()
    hashes = prompt_block_hashes(MODEL, "a document " * 300)
    idx.block_stored("p5-7", hashes)
    prof = profile(block_hashes=hashes, engine_block_hashes=hashes)
    for i in range(10):
        d = place(dataclasses.replace(prof, request_id=f"r{i}"), snapshot(fl, prefix_index=idx),
                  pol)
        assert "p5-7" in {c.endpoint for c in d.candidates}


def test_nothing_eligible_in_the_sample_falls_back_to_the_whole_fleet() -> None:
    fl = big(n_pools=4, per=20)
    states = {e.name: state(healthy=False) for e in fl.endpoints}
    states["p3-19"] = state()  # the one healthy endpoint
    pol = default(8)
    for i in range(5):
        d = place(profile(request_id=f"r{i}"), snapshot(fl, states), pol)
        assert d.picked is not None and d.picked.name == "p3-19"
    for e in fl.endpoints:
        states[e.name] = state(healthy=False)
    d = place(profile(), snapshot(fl, states), pol)
    assert d.picked is None
    assert d.removed_by == {"health": 80}  # every endpoint judged, not just the sample
    assert len(d.candidates) == 80


def test_a_fleet_within_the_limit_is_evaluated_whole_and_unchanged() -> None:
    fl = big(n_pools=2, per=8)
    a, b = default(0), default(16)
    for i in range(20):
        prof = profile(request_id=f"r{i}", session_id=f"s{i % 3}")
        da = place(prof, snapshot(fl), a)
        db = place(prof, snapshot(fl), b)
        assert da.candidates == db.candidates and da.endpoint == db.endpoint
        assert not any(n.startswith("sampled") for n in db.notes)


def test_round_robin_is_never_sampled() -> None:
    assert policies(BASE)["round-robin"].max_candidates == 0
    assert policies(BASE)["default"].max_candidates == 64
