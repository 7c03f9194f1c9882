"""End-to-end scheduling through every shipped profile, spillover evidence and the 503 path."""

from __future__ import annotations

from typing import Any

import pytest

from inferplane.config.loader import builtin_defaults
from inferplane.fleet.model import Fleet
from inferplane.placement.framework import place
from inferplane.placement.plugins.slo_first import SloFirst
from tests.placement_helpers import hetero, policies, profile, snapshot, state

CFG = hetero()
FLEET = Fleet.from_config(CFG)
SHIPPED = [p["name"] for p in builtin_defaults()["profiles"]]
HARD = {"model-served", "context-window", "health", "jurisdiction"}
EU = frozenset({"eu"})
HASHES = tuple(range(500, 520))


def test_shipped_profiles() -> None:
    assert set(SHIPPED) == {
        "default",
        "round-robin",
        "least-request",
        "random",
        "gie-default",
        "llmd-token-aware",
        "sglang-cache-aware",
        "dynamo-kv",
    }


@pytest.mark.parametrize("name", SHIPPED)
def test_every_profile_runs_the_hard_filters(name: str) -> None:
    spec = next(p for p in builtin_defaults()["profiles"] if p["name"] == name)
    assert {r["ref"] for r in spec["plugins"]} >= HARD
    pol = policies(CFG)[name]
    assert {f.name for f in pol.filters} >= HARD


@pytest.mark.parametrize("name", SHIPPED)
def test_end_to_end(name: str) -> None:
    pol = policies(CFG)[name]
    snap = snapshot(FLEET, {"eu-h100-0": state(inflight=30, inflight_tokens=60_000)})
    seen = set()
    for i in range(6):
        d = place(
            profile(
                request_id=f"r{i}",
                allowed_jurisdictions=EU,
                client_region="eu-west",
                block_hashes=HASHES,
            ),
            snap,
            pol,
        )
        assert d.policy == name and d.picked is not None
        assert d.picked.endpoint.substrate.jurisdiction == "eu"
        assert d.removed_by["jurisdiction"] == 4  # sovereign + 3 US endpoints
        assert d.removed_by["model-served"] == 1  # the 70B endpoint
        seen.add(d.endpoint)
        rec = {c.endpoint: c for c in d.candidates}
        assert rec["de-sov-0"].rejected_by == "jurisdiction"
    assert seen <= {"eu-h100-0", "eu-h100-1", "eu-a100-0"}
    if name == "round-robin":
        assert seen == {"eu-h100-0", "eu-h100-1", "eu-a100-0"}
    if name in ("least-request", "default"):
        assert "eu-h100-0" not in seen  # the loaded one


@pytest.mark.parametrize(
    "name", ["default", "gie-default", "llmd-token-aware", "sglang-cache-aware", "dynamo-kv"]
)
def test_cache_aware_profiles_stick_to_the_prefix(name: str) -> None:
    pol = policies(CFG)[name]
    snap = snapshot(FLEET)
    prof = profile(
        allowed_jurisdictions=EU, client_region="eu-west", block_hashes=HASHES, prompt_tokens=1280
    )
    first = place(prof, snap, pol).endpoint
    again = [place(prof.with_(request_id=f"x{i}"), snap, pol).endpoint for i in range(5)]
    assert again == [first] * 5


def test_default_prefers_reserved_cheapest_in_region_and_predicts() -> None:
    pol = policies(CFG)["default"]
    d = place(profile(client_region="eu-west"), snapshot(FLEET), pol)
    assert d.endpoint in {"eu-h100-0", "eu-h100-1"}
    assert d.predicted.ttft_s is not None and d.predicted.ttft_s < 1.0
    assert d.predicted.itl_s is not None and d.predicted.cost_usd is not None
    assert d.spillover is None
    assert isinstance(pol.picker, SloFirst)


def _saturated_eu(**kw: Any) -> dict[str, Any]:
    return {n: state(**kw) for n in ("eu-h100-0", "eu-h100-1")}


def test_spillover_when_the_preferred_pool_is_saturated() -> None:
    pol = policies(CFG)["default"]
    snap = snapshot(FLEET, _saturated_eu(inflight=64, inflight_tokens=64 * 2000))
    d = place(
        profile(
            priority="batch",
            allowed_jurisdictions=EU,
            client_region="eu-west",
            ttft_slo_s=None,
            itl_slo_s=None,
        ),
        snap,
        pol,
    )
    assert d.picked is not None and d.endpoint not in {"eu-h100-0", "eu-h100-1"}
    assert d.removed_by["saturation"] == 2
    s = d.spillover
    assert s is not None and s.chosen == d.endpoint
    assert s.from_region == "eu-west" and "2 saturated" in s.reason
    assert s.preferred in {"eu-h100-0", "eu-h100-1"}
    assert s.to_region == d.picked.endpoint.substrate.region


def test_spillover_when_the_preferred_pool_misses_the_slo() -> None:
    pol = policies(CFG)["default"]
    snap = snapshot(
        FLEET, _saturated_eu(waiting=400.0, running=64.0, inflight=60, inflight_tokens=60 * 4000)
    )  # 60 of 64: the reservation is not exhausted, the engines' queues are long
    d = place(profile(client_region="eu-west", allowed_jurisdictions=EU), snap, pol)
    assert d.endpoint == "eu-a100-0"  # burst, same region, meets the SLO
    s = d.spillover
    assert s is not None and "predicted over the SLO" in s.reason
    assert s.from_region == s.to_region == "eu-west"
    assert s.delta_ttft_s is not None and s.delta_ttft_s < 0  # faster than the preferred pool
    assert s.delta_cost_usd is not None


def test_spillover_region_defaults_to_the_cheapest_reserved() -> None:
    pol = policies(CFG)["default"]
    snap = snapshot(
        FLEET,
        {"us-h100-0": state(waiting=500.0, running=64.0, inflight=64, inflight_tokens=64 * 4000)},
    )
    # no client region: the cheapest reserved candidate is us-h100 ($2.5/h)
    d = place(profile(allowed_jurisdictions=frozenset({"us"})), snap, pol)
    assert d.endpoint != "us-h100-0"
    assert d.spillover is not None and d.spillover.from_region == "us-east"


def test_no_candidate_meets_the_slo_picks_the_best_score() -> None:
    pol = policies(CFG)["default"]
    d = place(
        profile(ttft_slo_s=1e-6, allowed_jurisdictions=EU, client_region="eu-west"),
        snapshot(FLEET),
        pol,
    )
    total = {c.endpoint: c.total for c in d.candidates if c.total is not None}
    assert d.endpoint is not None and total[d.endpoint] == max(total.values())
    assert any("best score" in n for n in d.notes)


def test_sovereign_requests_never_leave_their_jurisdiction() -> None:
    pol = policies(CFG)["default"]
    snap = snapshot(FLEET, {"de-sov-0": state(inflight=64, waiting=100.0, kv_usage=0.99)})
    sov = frozenset({"eu-sovereign"})
    d = place(profile(allowed_jurisdictions=sov), snap, pol)
    assert d.endpoint == "de-sov-0"  # overloaded, but the only place it may run
    d = place(profile(allowed_jurisdictions=sov, priority="batch"), snap, pol)
    assert d.picked is None  # shed rather than moved
    assert d.removed_by == {"model-served": 1, "jurisdiction": 6, "saturation": 1}


@pytest.mark.parametrize("name", SHIPPED)
def test_503_names_the_filters(name: str) -> None:
    pol = policies(CFG)[name]
    d = place(profile(allowed_jurisdictions=frozenset({"cn"})), snapshot(FLEET), pol)
    assert d.picked is None and d.predicted.ttft_s is None
    assert d.removed_by == {"model-served": 1, "jurisdiction": 7}
    assert all(c.rejected_by in ("model-served", "jurisdiction") for c in d.candidates)
    d = place(profile(model="nope"), snapshot(FLEET), pol)
    assert d.picked is None and d.removed_by == {"model-served": 8}


def test_context_window_filter_in_default() -> None:
    pol = policies(CFG)["default"]
    d = place(profile(prompt_tokens=20_000, client_region="eu-west"), snapshot(FLEET), pol)
    assert d.candidates[[c.endpoint for c in d.candidates].index("us-groq-0")].rejected_by == (
        "context-window"
    )
