"""Health beyond up/down (fleet/health.py): outlier ejection against peers with half-open
return, per-pool concurrency health, and ``GET /v1/fleet/health`` on an in-process gateway.

Everything runs on an injected clock; nothing waits on wall time.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from inferplane.config.schema import OutlierSpec, PoolHealthSpec
from inferplane.fleet.engine_metrics import EngineMetrics
from inferplane.fleet.health import (
    Observed,
    OutlierDetector,
    observe,
    peer_groups,
    pool_health,
    slope,
)
from inferplane.fleet.live import LiveFleet
from inferplane.fleet.model import Fleet
from inferplane.fleet.scraper import StaticMetricsSource
from inferplane.placement.build import build_policies
from inferplane.placement.framework import place
from tests.builders import key_hash, profile
from tests.support.procs import free_port

VLLM = (Path(__file__).parent / "fixtures" / "metrics" / "vllm.txt").read_text()
KEY = "sk-health"


def _sub(name: str, hardware: str, port: int, *eps: str, conc: int = 8) -> str:
    lines = [
        f"  - name: {name}",
        "    kind: gpu",
        f"    hardware: {hardware}",
        "    region: r1",
        "    jurisdiction: eu",
        "    cost: {hourly_usd: 3.0}",
        "    endpoints:",
    ]
    for i, e in enumerate(eps):
        lines += [
            f"      - name: {e}",
            f"        url: http://127.0.0.1:{port + i}",
            f"        max_concurrency: {conc}",
            "        models: [{name: m, profile: llama-3.1-8b, max_context: 8192}]",
        ]
    return "\n".join(lines) + "\n"


# Four H100 peers, two H200 peers (same model: not peers of the H100s), one lone A100.
FLEET_YAML = (
    "gateway: {seed: 1, metrics: {public: true}}\n"
    f'tenants: [{{name: t, api_keys: ["{key_hash(KEY)}"]}}]\n'
    "substrates:\n"
    + _sub("pool-a", "h100", 9100, "a0", "a1", "a2", "a3")
    + _sub("pool-b", "h200", 9110, "b0", "b1")
    + _sub("solo", "a100", 9120, "s0")
)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Env:
    clock: Clock
    live: LiveFleet
    det: OutlierDetector


def env(**outlier: Any) -> Env:
    cfg = parse_config(FLEET_YAML, "fleet.yaml")
    clock = Clock()
    live = LiveFleet(Fleet.from_config(cfg), stale_after_s=2.0, clock=clock)
    spec = OutlierSpec(**{"ttft_factor": 3.0, **outlier})  # TTFT ejection is opt-in
    return Env(clock, live, OutlierDetector(live.fleet, spec))


def feed(live: LiveFleet, name: str, ok: int = 0, err: int = 0, ttft: float | None = None,
         n_ttft: int = 0, predicted: float | None = None) -> None:
    for _ in range(ok):
        live.observe_outcome(name, True)
    for _ in range(err):
        live.observe_outcome(name, False)
    for _ in range(n_ttft):
        assert ttft is not None
        live.observe_ttft(name, ttft, predicted)


def healthy_peers(live: LiveFleet, *names: str) -> None:
    for n in names:
        feed(live, n, ok=10, ttft=0.4, n_ttft=10)


# -- outlier ejection --------------------------------------------------------------------------


def test_peer_groups_compare_like_with_like() -> None:
    groups = sorted(peer_groups(env().live.fleet).values())
    assert groups == [("a0", "a1", "a2", "a3"), ("b0", "b1"), ("s0",)]


# case: (per-endpoint feed, expected {endpoint: reason})
CASES: dict[str, tuple[dict[str, dict[str, Any]], dict[str, str]]] = {
    "error-rate outlier": (
        {"a0": {"ok": 2, "err": 8}}, {"a0": "error rate 0.80 vs peers 0.00"}),
    "error rate under min_error_rate": ({"a0": {"ok": 6, "err": 4}}, {}),
    "too few outcomes to judge": ({"a0": {"err": 9}}, {}),
    "fleet-wide errors eject nobody": (
        {n: {"ok": 2, "err": 8} for n in ("a0", "a1", "a2", "a3")}, {}),
    "TTFT outlier": (
        {"a0": {"ttft": 3.1, "n_ttft": 10}}, {"a0": "TTFT p50 3.1 s vs peers 0.4 s"}),
    "TTFT under k x peers": ({"a0": {"ttft": 1.1, "n_ttft": 10}}, {}),
    "TTFT under the noise floor": ({"a0": {"ttft": 0.04, "n_ttft": 10}}, {}),
    "other hardware is not a peer": (
        {"b0": {"ttft": 3.0, "n_ttft": 10}, "b1": {"ttft": 3.0, "n_ttft": 10}}, {}),
    "lone endpoint never a TTFT outlier": ({"s0": {"ttft": 30.0, "n_ttft": 50}}, {}),
    "lone endpoint never an error outlier": ({"s0": {"err": 50}}, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_outlier_cases(case: str) -> None:
    feeds, expected = CASES[case]
    e = env()
    healthy_peers(e.live, *(n for n in ("a0", "a1", "a2", "a3", "b0", "b1") if n not in feeds))
    for name, kw in feeds.items():
        feed(e.live, name, **kw)
    actions = e.det.run(e.live)
    assert {a.endpoint: a.reason for a in actions if a.eject} == expected
    snap = e.live.snapshot()
    for name, reason in expected.items():
        st = snap.by_name[name].state
        assert st.ejected and st.ejected_reason == reason
    assert sum(v.state.ejected for v in snap.endpoints) == len(expected)


@pytest.mark.parametrize(
    ("a0_ttft", "a0_predicted", "reason"),
    [
        # 8x the peers' TTFT, but for work predicted 8x longer (long prompts, a deep queue):
        # as fast as its peers for what it was given, so not an outlier.
        (3.2, 3.2, None),
        # the same TTFT for work predicted as the peers': 8x slower than predicted.
        (3.2, 0.4, "TTFT 8× its prediction vs peers 1× (p50 3.2 s)"),
        # slower than predicted, but under ttft_factor × the peers' ratio.
        (1.0, 0.4, None),
    ],
)
def test_ttft_outliers_are_judged_against_their_predictions(
    a0_ttft: float, a0_predicted: float, reason: str | None
) -> None:
    e = env()
    for n in ("a1", "a2", "a3", "b0", "b1"):
        feed(e.live, n, ok=10, ttft=0.4, n_ttft=10, predicted=0.4)
    feed(e.live, "a0", ok=10, ttft=a0_ttft, n_ttft=10, predicted=a0_predicted)
    actions = e.det.run(e.live)
    assert {a.endpoint: a.reason for a in actions if a.eject} == (
        {} if reason is None else {"a0": reason}
    )


def test_by_default_slowness_never_ejects() -> None:
    e = env(ttft_factor=None)
    assert OutlierSpec().ttft_factor is None
    healthy_peers(e.live, "a1", "a2", "a3", "b0", "b1")
    feed(e.live, "a0", ok=10, ttft=30.0, n_ttft=10)
    assert [a for a in e.det.run(e.live) if a.eject] == []


def test_raw_ttft_decides_when_peers_have_no_predictions() -> None:
    e = env()
    healthy_peers(e.live, "a1", "a2", "a3", "b0", "b1")  # TTFTs without predictions
    feed(e.live, "a0", ok=10, ttft=3.1, n_ttft=10, predicted=3.1)
    actions = e.det.run(e.live)
    assert {a.endpoint: a.reason for a in actions if a.eject} == {
        "a0": "TTFT p50 3.1 s vs peers 0.4 s"
    }


@pytest.mark.parametrize(("percent", "ejected"), [(0, set()), (25, {"a0"}), (50, {"a0", "a1"})])
def test_max_ejection_percent_caps_a_group_worst_first(percent: float, ejected: set[str]) -> None:
    e = env(max_ejection_percent=percent)
    healthy_peers(e.live, "a2", "a3")
    feed(e.live, "a0", err=10)
    feed(e.live, "a1", ok=1, err=9)
    e.det.run(e.live)
    e.clock.t += 1
    e.det.run(e.live)  # a second sweep does not exceed the cap either
    assert {v.name for v in e.live.snapshot().endpoints if v.state.ejected} == ejected


def test_ejection_grows_with_each_ejection_then_caps() -> None:
    e = env(base_ejection_s=30, max_ejection_s=75)
    durations = []
    for _ in range(4):
        healthy_peers(e.live, "a1", "a2", "a3")  # recent outcomes (within error_window_s)
        feed(e.live, "a0", err=10)
        (a,) = [a for a in e.det.run(e.live) if a.eject]
        assert a.until is not None
        durations.append(a.until - e.clock.t)
        e.clock.t += 29.0
        assert not e.det.run(e.live)  # still ejected one second before its end
        e.clock.t = a.until
        (back,) = e.det.run(e.live)  # half-open: back on probation, windows cleared
        assert not back.eject and not e.live.snapshot().by_name["a0"].state.ejected
        assert len(e.live.live["a0"].outcomes) == 0 and e.det.records["a0"].probation
    assert durations == [30.0, 60.0, 75.0, 75.0]


def test_half_open_recovery_ends_probation_and_decays_the_count() -> None:
    e = env(base_ejection_s=10, decay_s=60)
    healthy_peers(e.live, "a1", "a2", "a3")
    feed(e.live, "a0", err=10)
    e.det.run(e.live)
    e.clock.t += 10
    e.det.run(e.live)  # returned on probation
    rec = e.det.records["a0"]
    assert rec.probation and rec.ejections == 1
    feed(e.live, "a0", ok=5)
    e.clock.t += 1
    assert not e.det.run(e.live) and rec.probation  # not enough outcomes yet
    feed(e.live, "a0", ok=5)
    e.clock.t += 1
    assert not e.det.run(e.live)
    assert not rec.probation and rec.ejections == 1
    e.clock.t += 59
    e.det.run(e.live)
    assert rec.ejections == 1
    e.clock.t += 1
    e.det.run(e.live)
    assert rec.ejections == 0
    # a relapse after decay is a first ejection again: base duration
    feed(e.live, "a0", err=10)
    (a,) = e.det.run(e.live)
    assert a.eject and a.until == e.clock.t + 10


def test_return_on_probation_forgets_the_ttft_correction() -> None:
    """The TTFT ÷ prediction ratio that made the endpoint look ×4 slow is forgotten with its
    other observations when it comes back: placement must not keep penalising it."""
    e = env(base_ejection_s=10)
    healthy_peers(e.live, "a1", "a2", "a3")
    for _ in range(10):
        e.live.observe_ttft("a0", 4.0, predicted=1.0)
    feed(e.live, "a0", err=10)
    e.clock.t += 1
    view = {v.name: v for v in e.live.snapshot().endpoints}["a0"]
    assert view.state.ttft_ratio_p50 == pytest.approx(4.0)
    (a,) = e.det.run(e.live)
    assert a.eject
    e.clock.t += 10
    e.det.run(e.live)  # returned on probation
    assert e.det.records["a0"].probation
    e.clock.t += 1
    view = {v.name: v for v in e.live.snapshot().endpoints}["a0"]
    assert view.state.ttft_ratio_p50 is None
    assert view.state.ttft_p50_s is None


def test_reset_observations_clears_the_ttft_ratio_window() -> None:
    e = env()
    e.live.observe_ttft("a0", 2.0, predicted=0.5)
    e.live.reset_observations("a0")
    assert len(e.live.live["a0"].ttft_ratio) == 0


def test_relapse_on_probation_is_ejected_again_for_longer() -> None:
    e = env(base_ejection_s=10)
    healthy_peers(e.live, "a1", "a2", "a3")
    feed(e.live, "a0", err=10)
    e.det.run(e.live)
    e.clock.t += 10
    e.det.run(e.live)
    feed(e.live, "a0", ok=1, err=9)
    (a,) = e.det.run(e.live)
    assert a.eject and a.until == e.clock.t + 20 and e.det.records["a0"].ejections == 2


def test_stale_metrics_eject_a_healthy_endpoint_only() -> None:
    e = env(stale_eject_s=5.0)
    m = EngineMetrics(waiting=0.0, kv_usage=0.1)
    for n in ("a0", "a1", "a2", "a3", "b0", "b1"):
        e.live.update_metrics(n, m)
    e.live.set_health("b0", False)  # /health fails too: the health filter already says so
    e.clock.t += 6.0
    for n in ("a1", "a2", "a3", "b1"):
        e.live.update_metrics(n, m)
    actions = e.det.run(e.live)
    assert [(a.endpoint, a.kind, a.reason) for a in actions] == [
        ("a0", "stale", "metrics stale 6.0 s")
    ]  # s0 was never scraped (no /metrics at all): not judged on staleness
    # returned after the ejection, still stale: ejected again at once
    e.clock.t += 30.0
    for n in ("a1", "a2", "a3", "b1"):
        e.live.update_metrics(n, m)
    assert [a.eject for a in e.det.run(e.live)] == [False]
    e.clock.t += 1.0
    assert [(a.endpoint, a.eject) for a in e.det.run(e.live)] == [("a0", True)]


def test_stale_metrics_alone_eject_nobody_by_default() -> None:
    """Issue 12 item 1: staleness lowers the confidence in an endpoint's engine signals
    (placement ignores them) but does not eject it: the 30-minute soak lost 449 requests when a
    loaded gateway host let its scrapes go stale and ejected healthy endpoints."""
    e = env()
    m = EngineMetrics(waiting=0.0, kv_usage=0.1)
    for n in ("a0", "a1", "a2", "a3"):
        e.live.update_metrics(n, m)
    e.clock.t += 60.0
    for n in ("a1", "a2", "a3"):
        e.live.update_metrics(n, m)
    assert e.det.run(e.live) == []
    snap = e.live.snapshot()
    a0 = snap.by_name["a0"].state
    assert a0.stale and a0.usable and a0.queue_depth == 0.0  # placeable, engine signals unused
    cfg = parse_config(FLEET_YAML, "fleet.yaml")
    d = place(profile(model="m", tenant="t"), snap, build_policies(cfg, "<test>")["default"])
    assert d.candidate("a0").rejected_by is None


def test_stale_everywhere_ejects_nobody_even_when_opted_in() -> None:
    """With ``stale_eject_s`` set, an endpoint is ejected for staleness only while another
    endpoint of its model is fresher: every endpoint stale at once is the gateway's own fault
    (its host or network), never a reason to eject a whole model."""
    e = env(stale_eject_s=5.0, max_ejection_percent=100.0)
    m = EngineMetrics(waiting=0.0, kv_usage=0.1)
    for n in ("a0", "a1", "a2", "a3", "b0", "b1"):
        e.live.update_metrics(n, m)
    e.clock.t += 12.0
    assert e.det.run(e.live) == []
    e.live.update_metrics("a1", m)  # one fresh again: the others that serve m are outliers
    ejected = sorted(a.endpoint for a in e.det.run(e.live) if a.eject)
    assert ejected == ["a0", "a2", "a3", "b0", "b1"]


def test_old_failures_do_not_eject_a_recovered_endpoint() -> None:
    """The error-rate ejection judges the last ``error_window_s`` (120 s) only: ten failures
    five minutes ago and ten successes now are not an error rate of 0.5."""
    e = env()
    feed(e.live, "a0", err=10)
    e.clock.t += 300.0
    healthy_peers(e.live, "a1", "a2", "a3")
    feed(e.live, "a0", ok=10)
    assert e.det.run(e.live) == []
    feed(e.live, "a0", err=10)  # failing again now: ejected
    assert [(a.endpoint, a.kind) for a in e.det.run(e.live)] == [("a0", "error_rate")]


def test_health_filter_removes_the_ejected_endpoint_with_its_reason() -> None:
    e = env()
    healthy_peers(e.live, "a1", "a2", "a3")
    feed(e.live, "a0", ok=2, err=8)
    e.det.run(e.live)
    cfg = parse_config(FLEET_YAML, "fleet.yaml")
    policy = build_policies(cfg, "<test>")["default"]
    d = place(profile(model="m", tenant="t"), e.live.snapshot(), policy)
    rec = d.candidate("a0")
    assert rec.rejected_by == "health"
    assert rec.reason == "ejected: error rate 0.80 vs peers 0.00"
    assert d.picked is not None and d.picked.name != "a0"


def test_observe_reads_the_live_windows() -> None:
    e = env()
    feed(e.live, "a0", ok=3, err=1, ttft=0.2, n_ttft=4)
    o = observe(e.live, e.clock.t)["a0"]
    assert o == Observed(healthy=True, outcomes=4, error_rate=0.25, ttft_samples=4,
                         ttft_p50_s=0.2, metrics_age_s=None)


# -- pool concurrency health -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        ([(0.0, 3.0), (1.0, 3.0), (2.0, 3.0)], 0.0),
        ([(0.0, 0.0), (1.0, 2.0), (2.0, 4.0), (3.0, 6.0)], 2.0),
        ([(0.0, 1.0), (1.0, 0.0), (2.0, 3.0), (3.0, 2.0)], 0.6),  # least squares: 3 / 5
        ([(0.0, 1.0), (1.0, 5.0)], None),
        ([(1.0, 1.0), (1.0, 2.0), (1.0, 3.0)], None),
    ],
)
def test_slope(points: list[tuple[float, float]], expected: float | None) -> None:
    got = slope(points)
    assert got == (None if expected is None else pytest.approx(expected))


def scrape_series(e: Env, name: str, waiting: list[float], kv: list[float], dt: float = 1.0,
                  ) -> None:
    for w, k in zip(waiting, kv, strict=True):
        e.live.update_metrics(name, EngineMetrics(waiting=w, kv_usage=k))
        e.clock.t += dt
    e.clock.t -= dt  # now = the last scrape


SPEC = PoolHealthSpec(window_s=20.0, min_ttft_samples=20)


def test_pool_kv_mean_weighs_each_endpoint_once() -> None:
    """An endpoint scraped less often (an idle one, backed off) counts as much as a busy one."""
    e = env()
    scrape_series(e, "a0", [0.0] * 10, [0.8] * 10)  # busy, scraped 10 times
    scrape_series(e, "a1", [0.0], [0.0])  # idle, scraped once in the window
    p = pool_health(e.live, SPEC, e.clock.t)["pool-a"]
    assert p.kv_mean == pytest.approx(0.4) and p.kv_max == pytest.approx(0.8)


def test_concurrency_illusion_queue_grows_while_in_flight_is_low() -> None:
    e = env()
    # a0's queue grows 1 req/s over 10 scrapes; a1 flat; far below the envelope (1 of 32)
    scrape_series(e, "a0", [float(i) for i in range(10)], [0.3] * 10)
    e.clock.t -= 9.0
    scrape_series(e, "a1", [2.0] * 10, [0.5] * 10)
    e.live.reserve("a0", 100)
    p = pool_health(e.live, SPEC, e.clock.t)["pool-a"]
    assert p.queue_trend == pytest.approx(1.0)
    assert p.waiting == 11.0
    assert p.kv_mean == pytest.approx(0.4) and p.kv_max == 0.5
    assert p.inflight == 1 and p.envelope == 32 and p.inflight_ratio == pytest.approx(1 / 32)
    assert p.verdict == "past-envelope"
    assert p.reasons == ("queue growing 1.00 req/s over 20 s",)


def test_old_scrapes_fall_out_of_the_window() -> None:
    e = env()
    scrape_series(e, "a0", [float(i) for i in range(10)], [0.99] * 10)
    e.clock.t += 100.0
    scrape_series(e, "a0", [5.0] * 5, [0.2] * 5)
    p = pool_health(e.live, SPEC, e.clock.t)["pool-a"]
    assert p.queue_trend == 0.0 and p.kv_max == 0.2 and p.verdict == "ok" and p.reasons == ()


@pytest.mark.parametrize(
    ("kv", "ttft_tail", "inflight", "verdict", "reasons"),
    [
        ([0.2] * 5, 0.1, 0, "ok", ()),
        ([0.85] * 5, 0.1, 0, "pressure", ("KV usage mean 0.85",)),
        ([0.5, 0.5, 0.5, 0.5, 0.96], 0.1, 0, "past-envelope", ("KV usage max 0.96",)),
        ([0.2] * 5, 0.4, 0, "pressure", ("TTFT p99/p50 4.0",)),
        ([0.2] * 5, 0.7, 0, "past-envelope", ("TTFT p99/p50 7.0",)),
        ([0.2] * 5, 0.1, 26, "pressure", ("in-flight 26/32 of the concurrency envelope",)),
        ([0.2] * 5, 0.1, 33, "past-envelope", ("in-flight 33/32 of the concurrency envelope",)),
    ],
)
def test_pool_verdicts(kv: list[float], ttft_tail: float, inflight: int, verdict: str,
                       reasons: tuple[str, ...]) -> None:
    e = env()
    scrape_series(e, "a0", [1.0] * 5, kv)
    # 95 fast requests and 5 slow ones: p50 0.1 s, p99 = the slow ones
    feed(e.live, "a1", ttft=0.1, n_ttft=95)
    feed(e.live, "a2", ttft=ttft_tail, n_ttft=5)
    for _ in range(inflight):
        e.live.reserve("a3", 10)
    p = pool_health(e.live, SPEC, e.clock.t)["pool-a"]
    assert p.ttft_divergence == pytest.approx(ttft_tail / 0.1)
    assert (p.verdict, p.reasons) == (verdict, reasons)


def test_ejected_endpoints_leave_the_envelope_and_too_few_ttfts_are_unknown() -> None:
    e = env()
    feed(e.live, "a0", ttft=0.1, n_ttft=5)
    for n in ("a0", "a1", "a2", "a3"):
        e.live.set_ejected(n, n != "a3", "test")
    for _ in range(8):
        e.live.reserve("a3", 10)
    p = pool_health(e.live, SPEC, e.clock.t)["pool-a"]
    assert p.usable == 1 and p.envelope == 8 and p.ttft_divergence is None
    assert p.verdict == "past-envelope"
    e.live.set_ejected("a3", True, "test")
    q = pool_health(e.live, SPEC, e.clock.t)["pool-a"]
    assert q.inflight_ratio is None and q.reasons == ("no usable endpoint",)


# -- GET /v1/fleet/health on an in-process gateway ---------------------------------------------


@dataclass
class Gw:
    gw: Gateway
    base: str
    http: aiohttp.ClientSession


ADMIN = "sk-health-admin"


@asynccontextmanager
async def health_gateway(metrics: str) -> AsyncIterator[Gw]:
    """An in-process gateway over `FLEET_YAML` with ``gateway.metrics`` set to ``metrics``."""
    head = "gateway: {seed: 1, metrics: {public: true}}"
    cfg = parse_config(FLEET_YAML.replace(head, (
        f"gateway: {{seed: 1, metrics: {metrics}}}\n"
        "health: {outlier: {interval_s: 3600}}")), "fleet.yaml")
    source = StaticMetricsSource()
    for name in ("a0", "a1", "a2", "a3", "b0", "b1"):
        source.texts[name] = VLLM
    source.health["b1"] = False
    gateway = Gateway(cfg, metrics_source=source)
    port = free_port()
    runner: web.AppRunner = await serve(gateway, "127.0.0.1", port)
    try:
        async with aiohttp.ClientSession() as http:
            yield Gw(gateway, f"http://127.0.0.1:{port}", http)
    finally:
        await runner.cleanup()


@pytest.fixture
async def gw() -> AsyncIterator[Gw]:
    async with health_gateway(f'{{public: true, api_keys: ["{key_hash(ADMIN)}"]}}') as g:
        yield g


async def fleet_health_status(g: Gw, key: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with g.http.get(f"{g.base}/v1/fleet/health", headers=headers) as r:
        return r.status, await r.json()


async def test_fleet_health_is_for_admin_keys(gw: Gw) -> None:
    """Every endpoint's load, queue, KV use and error rate, in every jurisdiction, is what
    /metrics is admin-only for: a tenant's key is refused it (403) as it is /metrics, an admin
    key reads it; no key or an unknown one 401; `gateway.metrics.public` opens /metrics only."""
    status, body = await fleet_health_status(gw, None)
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    status, body = await fleet_health_status(gw, KEY)
    assert status == 403, body
    assert "gateway.metrics.api_keys" in body["error"]["message"]
    assert (await fleet_health_status(gw, "sk-nobody"))[0] == 403
    status, body = await fleet_health_status(gw, ADMIN)
    assert status == 200 and body["object"] == "fleet.health"


async def test_fleet_health_for_tenants_lets_every_tenant_key_read_it() -> None:
    """`gateway.metrics.fleet_health_for_tenants: true` is the old behaviour: any tenant's key
    (and any admin key) reads the whole fleet's health; no key or an unknown one is a 401.
    It does so with no admin keys configured too: the upgrade path of a deployment that never
    set `gateway.metrics.api_keys`."""
    with_admin = f'{{fleet_health_for_tenants: true, api_keys: ["{key_hash(ADMIN)}"]}}'
    for metrics, keys in [(with_admin, (KEY, ADMIN)),
                          ("{fleet_health_for_tenants: true}", (KEY,))]:
        async with health_gateway(metrics) as g:
            for key in keys:
                status, body = await fleet_health_status(g, key)
                assert status == 200 and len(body["endpoints"]) == 7, (metrics, key)
            for key in (None, "sk-nobody"):
                assert (await fleet_health_status(g, key))[0] == 401


async def test_fleet_health_without_admin_keys_is_not_served() -> None:
    async with health_gateway("{public: true}") as g:
        for key in (None, KEY):
            status, body = await fleet_health_status(g, key)
            assert status == 403 and "fleet_health_for_tenants" in body["error"]["message"]


async def test_fleet_health_route(gw: Gw) -> None:
    async with gw.http.get(f"{gw.base}/v1/fleet/health") as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "missing_api_key"
    live = gw.gw.live
    healthy_peers(live, "a1", "a2", "a3")
    feed(live, "a0", ok=2, err=8)
    gw.gw.sweep_outliers()
    auth = {"Authorization": f"Bearer {ADMIN}"}
    async with gw.http.get(f"{gw.base}/v1/fleet/health", headers=auth) as r:
        assert r.status == 200
        body = await r.json()
    eps = {e["endpoint"]: e for e in body["endpoints"]}
    assert list(eps) == ["a0", "a1", "a2", "a3", "b0", "b1", "s0"]
    a0 = eps["a0"]
    assert a0["ejected"] is True and a0["ejected_reason"] == "error rate 0.80 vs peers 0.00"
    assert a0["ejections"] == 1 and 0 < a0["ejected_for_s"] <= 30.0
    assert a0["error_rate"] == pytest.approx(0.8) and a0["healthy"] is True
    assert eps["a1"]["ttft_p50_s"] == pytest.approx(0.4) and eps["a1"]["ejected"] is False
    assert eps["a1"]["stale"] is False and eps["a1"]["waiting"] is not None
    assert eps["b1"]["healthy"] is False
    assert eps["s0"]["stale"] is True and eps["s0"]["kv_usage"] is None
    pools = {p["substrate"]: p for p in body["pools"]}
    assert set(pools) == {"pool-a", "pool-b", "solo"}
    assert pools["pool-a"]["usable_endpoints"] == 3
    assert pools["pool-a"]["concurrency_envelope"] == 24
    assert pools["pool-a"]["verdict"] in {"ok", "pressure", "past-envelope"}
    async with gw.http.get(f"{gw.base}/metrics") as r:
        text = await r.text()
    assert 'inferplane_endpoint_ejections_total{endpoint="a0",reason_kind="error_rate"} 1.0' in text
    assert 'inferplane_endpoint_ejected{endpoint="a0"} 1.0' in text
    assert 'inferplane_endpoint_ejected{endpoint="a1"} 0.0' in text
    for name in ("queue_trend", "ttft_divergence", "inflight_ratio"):
        assert f'inferplane_pool_{name}{{substrate="pool-a"}}' in text
    assert 'inferplane_pool_kv_pressure{stat="max",substrate="pool-a"}' in text
    verdicts = [line for line in text.splitlines()
                if line.startswith('inferplane_pool_verdict{substrate="solo"')]
    assert len(verdicts) == 3 and sum(float(v.rsplit(" ", 1)[1]) for v in verdicts) == 1.0


# -- the sweep at fleet scale ------------------------------------------------------------------


def _old_peer_judge(det: OutlierDetector, observed: dict[str, Observed],
                    members: list[str]) -> dict[str, str | None]:
    """Each member judged against the medians of its peers' lists built one member at a time
    (the sweep before `_PeerMedians`), for the same thresholds."""
    from statistics import median

    sp, n, out = det.spec, det.spec.min_requests, {}
    for m in members:
        o, peers = observed[m], [observed[p] for p in members if p != m]
        reason = None
        rates = [p.error_rate for p in peers if p.outcomes >= n]
        if o.outcomes >= n and rates:
            med = median(rates)
            if o.error_rate >= max(sp.min_error_rate, med + sp.error_rate_margin):
                reason = f"error rate {o.error_rate:.2f} vs peers {med:.2f}"
        if reason is None and o.ttft_samples >= n and o.ttft_p50_s is not None and (
            o.ttft_p50_s >= sp.min_ttft_s
        ):
            ratios = [p.ratio_p50 for p in peers
                      if p.ratio_samples >= n and p.ratio_p50 is not None]
            p50s = [p.ttft_p50_s for p in peers if p.ttft_samples >= n and p.ttft_p50_s is not None]
            if o.ratio_samples >= n and o.ratio_p50 is not None and ratios:
                med = median(ratios)
                if o.ratio_p50 >= (sp.ttft_factor or 0) * med > 0:
                    reason = f"ratio {med!r}"
            elif p50s:
                med = median(p50s)
                if o.ttft_p50_s >= max(sp.min_ttft_s, (sp.ttft_factor or 0) * med):
                    reason = f"p50 {med!r}"
        out[m] = reason
    return out


@pytest.mark.parametrize("seed", range(6))
def test_peer_medians_judge_as_each_members_peer_list_did(seed: int) -> None:
    import random

    rng = random.Random(seed)
    det = env(max_ejection_percent=100).det
    members = [f"x{i}" for i in range(rng.randint(1, 40))]
    det.records = {m: det.records.get(m) or type(det.records["a0"])() for m in members}
    pick = lambda *xs: rng.choice(xs)  # noqa: E731 - few values: ties and duplicates
    observed = {m: Observed(
        outcomes=pick(0, 3, 5, 20), error_rate=pick(0.0, 0.1, 0.5, 0.9, 1.0),
        ttft_samples=pick(0, 5, 20), ttft_p50_s=pick(None, 0.2, 0.4, 2.0, 9.0),
        ratio_samples=pick(0, 5, 20), ratio_p50=pick(None, 0.5, 1.0, 4.0)) for m in members}
    expected = _old_peer_judge(det, observed, members)
    from inferplane.fleet.health import _PeerMedians

    peers = _PeerMedians([observed[m] for m in members], det.spec.min_requests)
    got = {}
    for m in members:
        o = det._judge(m, peers, observed[m])
        got[m] = None if o is None else (o.reason if o.kind == "error_rate" else (
            f"ratio {peers.ratio(observed[m])!r}" if "prediction" in o.reason
            else f"p50 {peers.ttft_p50(observed[m])!r}"))
    assert got == expected


def test_a_sweep_reads_each_observation_a_bounded_number_of_times() -> None:
    """One group of 400 alike endpoints: the sweep reads the observations O(n) times (it built
    every member's peer list, 400 × 399 reads, which at 2,000 endpoints held the event loop
    ~125 ms every second)."""
    from collections.abc import Iterator, Mapping

    class Counting(Mapping[str, Observed]):
        def __init__(self, d: dict[str, Observed]) -> None:
            self.d, self.reads = d, 0

        def __getitem__(self, k: str) -> Observed:
            self.reads += 1
            return self.d[k]

        def __iter__(self) -> Iterator[str]:
            return iter(self.d)

        def __len__(self) -> int:
            return len(self.d)

    det = env().det
    names = [f"x{i}" for i in range(400)]
    det.groups = {("h100", 1, ()): tuple(names)}
    det.records = {m: type(det.records["a0"])() for m in names}
    observed = Counting({m: Observed(outcomes=10, error_rate=0.0) for m in names})
    assert det.sweep(observed, 1000.0) == []
    assert observed.reads <= 10 * len(names)


class _NoWalk(dict[str, Any]):
    """A records dict that refuses to be walked (lookups by name are fine)."""

    def items(self) -> Any:
        raise AssertionError("walked every record")

    def values(self) -> Any:
        raise AssertionError("walked every record")

    def __iter__(self) -> Any:
        raise AssertionError("walked every record")


@pytest.mark.parametrize("seed", range(6))
def test_rate_limited_equals_a_walk_over_every_record_without_walking_them(seed: int) -> None:
    """Through random 429 ejections (some shorter than one already running), other ejections
    at once, sweeps that return and eject, and a reload, `OutlierDetector.rate_limited` gives
    what a walk over every record gives (kind ``rate_limited`` while ejected), and finds them
    without the walk (a request's 429 or 503 asked for it by walking all 2,000 records)."""
    rng = random.Random(seed)
    e = env(min_requests=3, max_ejection_percent=100)
    names = [v.name for v in e.live.snapshot().endpoints]
    for step in range(300):
        name, op = rng.choice(names), rng.randrange(6)
        now = e.clock()
        if op == 0:
            e.det.eject_now(name, now, "rate_limited", "429", rng.choice([None, 0.5, 5.0, 30.0]))
        elif op == 1:
            e.det.eject_now(name, now, "passive", "passive failure", rng.choice([None, 2.0]))
        elif op == 2:
            feed(e.live, name, ok=rng.randint(0, 3), err=rng.randint(0, 5))
        elif op == 3:
            e.det.run(e.live)
        elif op == 4 and rng.random() < 0.1:
            e.det.reconfigure(e.live.fleet, fresh=[name])
        e.clock.t += rng.choice([0.0, 0.1, 1.0, 3.0, 10.0])
        walked = {
            n: r.ejected_until
            for n, r in e.det.records.items()
            if r.kind == "rate_limited" and r.ejected_until is not None
        }
        records = e.det.records
        e.det.records = _NoWalk(records)
        try:
            assert e.det.rate_limited() == walked, step
        finally:
            e.det.records = records


def test_rate_limited_finds_a_record_any_ejection_path_gave_that_kind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`OutlierDetector.rate_limited` follows the kind a record is given, not the path: a sweep
    that ejected an outlier of kind ``rate_limited`` (none of today's judgements does) is found
    too (``_limited`` was filled by `eject_now` alone)."""
    from inferplane.fleet import health

    e = env(min_requests=3, max_ejection_percent=100)
    name = e.live.snapshot().endpoints[0].name

    def judge(self: Any, m: str, peers: Any, o: Any) -> Any:
        return health._Outlier(m, "rate_limited", "429s", 1.0) if m == name else None

    monkeypatch.setattr(health.OutlierDetector, "_judge", judge)
    e.det.run(e.live)
    rec = e.det.records[name]
    assert rec.kind == "rate_limited" and rec.ejected_until is not None
    assert e.det.rate_limited() == {name: rec.ejected_until}
