"""Failure semantics (issue 10 item 5, issue 12 item 12): consecutive-failure ejection with
half-open return, the first-byte timeout that ejects a hung engine, re-placement while
candidates remain (preferring another failure domain), and spillovers that are never silent.

Placement cases run on snapshots built in code; the request-path cases run an in-process gateway
in front of real fake upstreams on loopback (`tests.support.fake_upstream`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway, hash_key
from inferplane.config.loader import parse_config
from inferplane.config.schema import OutlierSpec
from inferplane.fleet.health import OutlierDetector
from inferplane.fleet.live import LiveFleet
from inferplane.fleet.model import Fleet
from inferplane.placement.framework import SPILLOVER_REASONS, place
from tests.builders import endpoint, pool_fleet, to_yaml
from tests.placement_helpers import config, hetero, policies, profile, snapshot, state, sub
from tests.support.fake_upstream import build
from tests.support.procs import free_port

EU = frozenset({"eu"})
EU_US = frozenset({"eu", "us"})

# -- consecutive failures (pure, fake clock) ---------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _detector(n: int = 3, **spec: Any) -> tuple[LiveFleet, OutlierDetector, Clock]:
    fl = Fleet.from_config(config(sub("pool", n=n)))
    clock = Clock()
    live = LiveFleet(fl, clock=clock)
    return live, OutlierDetector(fl, OutlierSpec(**spec)), clock


def _fail(live: LiveFleet, det: OutlierDetector, name: str, timeout: bool = False) -> Any:
    live.observe_outcome(name, False, timeout=timeout)
    return det.note_failure(live, name)


def test_consecutive_5xx_ejects_at_the_threshold_and_a_success_resets_the_count() -> None:
    live, det, _ = _detector(consecutive_5xx=3)
    assert _fail(live, det, "pool-0") is None
    assert _fail(live, det, "pool-0") is None
    live.observe_outcome("pool-0", True)  # a success in between: the count starts over
    assert _fail(live, det, "pool-0") is None
    assert _fail(live, det, "pool-0") is None
    a = _fail(live, det, "pool-0")
    assert a is not None and a.eject and a.kind == "consecutive_5xx"
    assert live.live["pool-0"].ejected and "3 consecutive failures" in a.reason
    assert a.until == pytest.approx(100.0 + 30.0)  # base_ejection_s × 1


def test_half_open_return_reejects_on_one_failure_for_longer() -> None:
    live, det, clock = _detector(consecutive_5xx=2)
    _fail(live, det, "pool-0")
    assert _fail(live, det, "pool-0") is not None
    clock.t += 31.0
    det.run(live)  # the ejection expired: back on probation, windows cleared
    assert not live.live["pool-0"].ejected and det.records["pool-0"].probation
    a = _fail(live, det, "pool-0")  # one failure on probation suffices
    assert a is not None and "(on probation)" in a.reason
    assert a.until == pytest.approx(clock.t + 60.0)  # second ejection: 2 × base


def test_probation_ends_after_successes() -> None:
    live, det, clock = _detector(consecutive_5xx=2, min_requests=3)
    _fail(live, det, "pool-0")
    _fail(live, det, "pool-0")
    clock.t += 31.0
    det.run(live)
    for _ in range(3):
        live.observe_outcome("pool-0", True)
    det.run(live)
    assert not det.records["pool-0"].probation
    assert _fail(live, det, "pool-0") is None  # the full threshold applies again


def test_first_byte_timeouts_eject_a_hung_endpoint() -> None:
    live, det, _ = _detector(consecutive_timeouts=2)
    assert _fail(live, det, "pool-1", timeout=True) is None
    a = _fail(live, det, "pool-1", timeout=True)
    assert a is not None and a.kind == "first_byte_timeout"
    assert "2 consecutive first-byte timeouts" in live.live["pool-1"].ejected_reason


def test_the_cap_counts_alternatives_and_a_lone_endpoint_is_never_ejected() -> None:
    live, det, _ = _detector(n=3, consecutive_5xx=1)  # cap floor(3 × 50 %) = 1
    assert _fail(live, det, "pool-0") is not None
    assert _fail(live, det, "pool-1") is None  # a second one would pass the cap
    live1, det1, _ = _detector(n=1, consecutive_5xx=1)
    assert _fail(live1, det1, "pool-0") is None  # nothing could take its traffic


def test_consecutive_ejection_can_be_switched_off() -> None:
    live, det, _ = _detector(consecutive_5xx=None, consecutive_timeouts=None)
    for _ in range(20):
        assert _fail(live, det, "pool-0", timeout=True) is None


def test_an_endpoint_starved_by_its_error_rate_is_tried_again_and_then_ejected() -> None:
    """Issue 12 item 3. Two peers; pool-1 fails every other attempt. The error-rate term steers
    traffic away from it after its first failure. With a window that moved only with traffic its
    rate stayed at 1.0: it got 1 attempt in 10 minutes, was never ejected (too few outcomes) and
    never recovered, while pool-0 carried everything past its max_concurrency. With the
    time-decayed rate it is tried again as its failures age, and its failures, counted in the
    sweep's window, eject it."""
    cfg = config(sub("pool", n=2, max_concurrency=8,
                     cost={"input_per_mtok": 1.0, "output_per_mtok": 2.0}))
    fl = Fleet.from_config(cfg)
    clock = Clock()
    live = LiveFleet(fl, clock=clock)
    det = OutlierDetector(fl, OutlierSpec())
    policy = policies(cfg)["default"]
    held: list[tuple[float, Any]] = []
    picks = {"pool-0": 0, "pool-1": 0}
    ejected: list[str] = []
    start = clock.t
    for step in range(2400):  # 4 requests/s for 600 s, each holding its endpoint 3 s
        clock.t = start + step * 0.25
        for item in [h for h in held if h[0] <= clock.t]:
            held.remove(item)
            item[1].release()
            live.observe_outcome(item[1].endpoint, True)
        if step % 4 == 0:
            ejected += [a.reason for a in det.run(live) if a.eject]
        d = place(profile(request_id=f"r{step}"), live.snapshot(), policy)
        assert d.picked is not None
        name = d.picked.name
        picks[name] += 1
        res = live.reserve(name, 100)
        if name == "pool-1" and picks[name] % 2:
            res.release()
            live.observe_outcome(name, False)
        else:
            held.append((clock.t + 3.0, res))
    assert picks["pool-1"] >= 10  # tried again (1 attempt before the change)
    assert any(r.startswith("error rate") for r in ejected)  # and ejected by the sweep


# -- spillover: every departure has a reason --------------------------------------------------

CFG = hetero()
FLEET = Fleet.from_config(CFG)


def _place(states: Mapping[str, Any], **kw: Any) -> Any:
    base: dict[str, Any] = {"client_region": "eu-west", "allowed_jurisdictions": EU_US}
    base.update(kw)
    return place(profile(**base), snapshot(FLEET, states), policies(CFG)["default"])


def test_outage_of_the_eu_reserved_pool_is_a_recorded_spillover() -> None:
    """Issue 10: both EU reserved endpoints down → an eu-west request went to the US with
    ``spillover: null``. Now the departure is recorded with its reason and deltas."""
    down = {n: state(healthy=False) for n in ("eu-h100-0", "eu-h100-1")}
    d = _place(down)
    assert d.picked is not None and d.endpoint not in down
    s = d.spillover
    assert s is not None and s.kind == "outage" and s.from_region == "eu-west"
    assert "2 failing /health" in s.reason and s.preferred in down
    assert s.to_region == d.picked.endpoint.substrate.region
    assert s.delta_rtt_s is not None and s.delta_cost_usd is not None
    assert "reason=outage" in s.header_value() and "from=eu-west" in s.header_value()


def test_outage_spillover_never_crosses_a_jurisdiction() -> None:
    down = {n: state(healthy=False) for n in ("eu-h100-0", "eu-h100-1")}
    d = _place(down, allowed_jurisdictions=EU)
    assert d.endpoint == "eu-a100-0"  # EU burst: the only EU capacity left
    assert d.spillover is not None and d.spillover.kind == "outage"
    d = _place({**down, "eu-a100-0": state(healthy=False)}, allowed_jurisdictions=EU)
    assert d.picked is None  # nothing in the EU: a 503, never the US


def test_a_sovereign_endpoint_down_is_not_an_acme_spillover() -> None:
    # de-sov is reserved in eu-west but outside acme's jurisdictions: not its preferred set
    d = _place({"de-sov-0": state(healthy=False)})
    assert d.endpoint in {"eu-h100-0", "eu-h100-1"} and d.spillover is None


@pytest.mark.parametrize(
    ("states", "excluded", "kind"),
    [
        ({n: state(ejected=True, ejected_reason="5 consecutive failures")
          for n in ("eu-h100-0", "eu-h100-1")}, (), "errors"),
        ({n: state(ejected=True, ejected_reason="2 consecutive first-byte timeouts")
          for n in ("eu-h100-0", "eu-h100-1")}, (), "timeout"),
        ({n: state(ejected=True, ejected_reason="rate limited: HTTP 429, Retry-After 5 s")
          for n in ("eu-h100-0", "eu-h100-1")}, (), "rate_limited"),
        ({}, ("eu-h100-0", "eu-h100-1"), "failover"),
        ({n: state(inflight=64) for n in ("eu-h100-0", "eu-h100-1")}, (), "reserved_exhausted"),
    ],
)
def test_every_departure_has_its_reason(
    states: Mapping[str, Any], excluded: tuple[str, ...], kind: str
) -> None:
    d = _place(states, excluded=frozenset(excluded))
    assert d.picked is not None and not d.endpoint.startswith("eu-h100")
    assert d.spillover is not None and d.spillover.kind == kind
    assert kind in SPILLOVER_REASONS


def test_reserved_exhausted_with_nowhere_else_stays_on_the_reservation() -> None:
    cfg = config(sub("res", n=2, max_concurrency=4))
    fl = Fleet.from_config(cfg)
    full = {"res-0": state(inflight=4), "res-1": state(inflight=4)}
    d = place(profile(), snapshot(fl, full), policies(cfg)["default"])
    assert d.picked is not None and d.spillover is None
    assert any("reserved capacity exhausted" in n for n in d.notes)


def test_committed_concurrency_sizes_the_reservation() -> None:
    raw = sub("res", n=2, max_concurrency=64)
    raw["committed_concurrency"] = 10
    burst = sub("burst", capacity="burst", cost={"hourly_usd": 9.0})
    cfg = config(raw, burst)
    fl = Fleet.from_config(cfg)
    pol = policies(cfg)["default"]
    d = place(profile(), snapshot(fl, {"res-0": state(inflight=5), "res-1": state(inflight=4)}),
              pol)
    assert d.endpoint in {"res-0", "res-1"}  # 9 of 10 committed slots in use
    d = place(profile(), snapshot(fl, {"res-0": state(inflight=5), "res-1": state(inflight=5)}),
              pol)
    assert d.endpoint == "burst-0"
    assert d.spillover is not None and d.spillover.kind == "reserved_exhausted"
    rec = d.candidate("res-0")
    assert rec.rejected_by == "reserved-capacity" and "10/10" in (rec.reason or "")


def test_committed_concurrency_is_for_reserved_capacity_only() -> None:
    raw = sub("b", capacity="burst")
    raw["committed_concurrency"] = 4
    with pytest.raises(Exception, match="reserved capacity only"):
        config(raw)


def test_replacement_prefers_another_failure_domain_then_zone() -> None:
    subs = []
    for name, fd, zone in (("a", "rack-1", "z1"), ("b", "rack-1", "z1"), ("c", "rack-2", "z1"),
                           ("d", "rack-3", "z2")):
        s = sub(name)
        s["failure_domain"], s["zone"] = fd, zone
        subs.append(s)
    cfg = config(*subs)
    fl = Fleet.from_config(cfg)
    pol = policies(cfg)["default"]
    prof = profile(excluded=frozenset({"a-0"}), avoid_domains=frozenset({"fd:rack-1", "zone:z1"}))
    d = place(prof, snapshot(fl), pol)
    assert d.endpoint == "d-0"  # another rack and another zone
    assert d.candidate("b-0").rejected_by == "failure-domain"
    assert d.candidate("c-0").rejected_by == "failure-domain"
    # the only other capacity shares the zone: still used (the filter never empties the set)
    d = place(prof.with_(excluded=frozenset({"a-0", "d-0"})), snapshot(fl), pol)
    assert d.endpoint == "c-0"


# -- the request path: in-process gateway, fake upstreams on loopback --------------------------

KEY = "sk-failover"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}


def _ep(name: str, port: int) -> str:
    return (f"{{name: {name}, url: 'http://127.0.0.1:{port}', "
            "models: [{name: m, profile: llama-3.1-8b, max_context: 8192}]}")


async def _upstreams(modes: Mapping[str, str]) -> tuple[dict[str, int], list[web.AppRunner]]:
    ports, runners = {}, []
    for name, mode in modes.items():
        port = free_port()
        r = web.AppRunner(build(name, mode, 0.0), handler_cancellation=True)
        await r.setup()
        await web.TCPSite(r, "127.0.0.1", port).start()
        ports[name], runners = port, [*runners, r]
    return ports, runners


async def _gateway(yaml: str) -> tuple[Gateway, web.AppRunner, str]:
    port = free_port()
    gw = Gateway(parse_config(yaml.replace("GW_PORT", str(port))))
    runner = await serve(gw, "127.0.0.1", port)
    return gw, runner, f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def _running(
    modes: Mapping[str, str], gateway: Mapping[str, Any] | None = None,
    outlier: Mapping[str, Any] | None = None,
) -> AsyncIterator[tuple[Gateway, str, dict[str, int]]]:
    """Upstreams in ``modes`` (`_upstreams`) and a gateway over them in one pool (`_pool`):
    (the gateway, its base URL, each upstream's port); all stopped at the end."""
    ports, ups = await _upstreams(modes)
    gw, runner, base = await _gateway(_pool(ports, gateway, outlier))
    try:
        yield gw, base, ports
    finally:
        await runner.cleanup()
        for u in ups:
            await u.cleanup()


def _pool(ports: Mapping[str, int], gateway: Mapping[str, Any] | None = None,
          outlier: Mapping[str, Any] | None = None) -> str:
    """One pool of endpoints; round-robin placement, so every endpoint meets its share of the
    requests whatever the prefix and latency scorers would prefer."""
    return to_yaml(pool_fleet(
        gateway={"port": "GW_PORT", "scrape_interval_s": 0.05, "default_profile": "round-robin",
                 "metrics": {"public": True}, **(gateway or {})},
        health={"outlier": dict(outlier or {})},
        admission={"retry": {"budget_min_per_s": 1000}},
        substrate={"cost": {"hourly_usd": 3.0}},
        endpoints=[endpoint(n, p) for n, p in ports.items()],
        key=KEY,
    ))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {KEY}"}, timeout=aiohttp.ClientTimeout(total=20)
    ) as s:
        yield s


@pytest.mark.parametrize("stream", [False, True])
async def test_no_client_error_while_healthy_peers_remain(
    session: aiohttp.ClientSession, stream: bool
) -> None:
    """One endpoint answers 500 with /health green, two peers are healthy: every client gets a
    200, and the failing one is ejected after ``consecutive_5xx`` failures, not ~38."""
    async with _running({"bad": "fail500", "ok-1": "ok", "ok-2": "ok"},
                        outlier={"interval_s": 60}) as (gw, base, _):
        for _ in range(30):
            async with session.post(f"{base}/v1/chat/completions",
                                    json={**CHAT, "stream": stream}) as r:
                assert r.status == 200, await r.text()
                assert r.headers["x-inferplane-endpoint"] != "bad"
                await r.read()
        bad = gw.live.live["bad"]
        assert bad.ejected and "5 consecutive failures" in bad.ejected_reason
        assert bad.requests_total == 5  # the sweep (every 60 s here) played no part
        async with session.get(f"{base}/metrics") as r:
            text = await r.text()
        assert ('inferplane_endpoint_ejections_total{endpoint="bad",'
                'reason_kind="consecutive_5xx"} 1.0') in text


async def test_replacement_continues_past_two_failed_endpoints(
    session: aiohttp.ClientSession,
) -> None:
    # no ejection: every request meets both failing endpoints' chance
    async with _running({"bad-1": "fail500", "bad-2": "fail500", "ok": "ok"},
                        outlier={"consecutive_5xx": None, "enabled": False}) as (_, base, _):
        attempts = set()
        for _ in range(12):
            async with session.post(f"{base}/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200, await r.text()
                assert r.headers["x-inferplane-endpoint"] == "ok"
                rid = r.headers["x-inferplane-decision-id"]
            async with session.get(f"{base}/v1/decisions/{rid}") as r:
                attempts.add((await r.json())["outcome"]["attempts"])
        assert 3 in attempts  # bad-1, bad-2, then ok: two re-placements


@pytest.mark.parametrize("stream", [True, False])
async def test_a_hung_engine_is_timed_out_replaced_and_ejected(
    session: aiohttp.ClientSession, stream: bool
) -> None:
    """Issue 12 item 12: an engine that accepts and never answers. The first-byte timeout
    (floor 0.5 s here) re-places the request, and two timeouts in a row eject the engine."""
    async with _running(
        {"hung": "hang", "ok-1": "ok", "ok-2": "ok"},
        gateway={"first_byte_timeout": {"floor_s": 0.5, "factor": 2, "unpredicted_s": 0.5}},
        outlier={"interval_s": 60},
    ) as (gw, base, _):
        for _ in range(12):
            async with session.post(f"{base}/v1/chat/completions",
                                    json={**CHAT, "stream": stream}) as r:
                assert r.status == 200, await r.text()
                assert r.headers["x-inferplane-endpoint"] != "hung"
                body = await r.read()
                assert b"ok-" in body  # the answer of a healthy peer, whole
        hung = gw.live.live["hung"]
        assert hung.ejected and "first-byte timeouts" in hung.ejected_reason
        assert hung.requests_total == 2 and hung.inflight == 0
        async with session.get(f"{base}/metrics") as r:
            text = await r.text()
        assert 'endpoint="hung",reason="first_byte_timeout"' in text


@pytest.mark.parametrize("stream", [True, False])
async def test_a_hung_engine_is_still_ejected_while_the_loop_lags(
    session: aiohttp.ClientSession, stream: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of issue 12 item 1: loop lag must not stretch a first-byte timeout without bound.
    The lag is injected through the gateway's `LoopLag`: every second of wall time counts as
    lost (a loop that never runs on time, as on an overloaded gateway), so the running-time
    deadline alone would never fire and the hung engine would hold each request for the whole
    ``upstream_timeout_s``. The wall-clock cap (``max_stretch`` × the timeout) still times it
    out: the request is re-placed and the engine ejected for first-byte timeouts."""
    async with _running(
        {"hung": "hang", "ok-1": "ok", "ok-2": "ok"},
        gateway={"upstream_timeout_s": 60, "first_byte_timeout": {
            "floor_s": 0.2, "factor": 1, "unpredicted_s": 0.2, "max_stretch": 2}},
        outlier={"interval_s": 60},
    ) as (gw, base, _):
        monkeypatch.setattr(gw.lag, "lost_at", lambda now: now)  # all wall time is lag
        mark = gw.lag.mark()
        for _ in range(12):
            async with session.post(f"{base}/v1/chat/completions",
                                    json={**CHAT, "stream": stream}) as r:
                assert r.status == 200, await r.text()
                assert r.headers["x-inferplane-endpoint"] != "hung"
                assert b"ok-" in await r.read()
        assert gw.lag.ran_s(mark) == 0.0  # the gateway never counted any running time
        hung = gw.live.live["hung"]
        assert hung.ejected and "first-byte timeouts" in hung.ejected_reason
        assert hung.requests_total == 2 and hung.inflight == 0


@pytest.mark.parametrize("stream", [True, False])
async def test_the_gateways_own_stall_is_not_a_first_byte_timeout(
    session: aiohttp.ClientSession, stream: bool
) -> None:
    """Issue 12 item 1: a first-byte timeout counts the gateway's running time. Here the event
    loop the gateway runs on is blocked for 0.6 s (the upstream shares it, `stall` mode) — as
    when a loaded host deschedules the gateway — against a 0.3 s first-byte timeout: the time
    lost is the gateway's own lag, so the first attempt is answered and nobody is blamed (the
    code before timed both endpoints out, re-placed twice and ejected one)."""
    async with _running(
        {"s-1": "stall", "s-2": "stall"},
        gateway={"first_byte_timeout": {"floor_s": 0.3, "factor": 1, "unpredicted_s": 0.3}},
        outlier={"interval_s": 60, "consecutive_timeouts": 1},
    ) as (gw, base, ports):
        await asyncio.sleep(0.3)  # the loop-lag ticker has ticked
        async with session.post(f"{base}/v1/chat/completions",
                                json={**CHAT, "stream": stream}) as r:
            assert r.status == 200, await r.text()
            rid = r.headers["x-inferplane-decision-id"]
            await r.read()
        async with session.get(f"{base}/v1/decisions/{rid}") as r:
            assert (await r.json())["outcome"]["attempts"] == 1
        for name in ports:
            rec = gw.live.live[name]
            assert not rec.ejected and rec.consecutive_timeouts == 0
        assert gw.lag.lost_s >= 0.5  # the stall was measured


async def test_outage_spillover_is_announced_and_counted(session: aiohttp.ClientSession) -> None:
    """Both EU reserved endpoints down (nothing listens): the request goes to the US burst
    endpoint, the client is told in ``x-inferplane-spillover``, the metric has the reason and
    the decision record carries it."""
    ports, ups = await _upstreams({"us-0": "ok"})
    dead1, dead2 = free_port(), free_port()
    yaml = f"""
gateway: {{port: GW_PORT, scrape_interval_s: 0.05, metrics: {{public: true}}}}
regions:
  - {{name: eu-west, rtt_ms: {{us-east: 80}}}}
  - {{name: us-east}}
substrates:
  - {{name: eu-res, kind: gpu, hardware: h100, region: eu-west, jurisdiction: eu,
     cost: {{hourly_usd: 3.0}}, endpoints: [{_ep("eu-0", dead1)}, {_ep("eu-1", dead2)}]}}
  - {{name: us-burst, kind: gpu, hardware: h100, region: us-east, jurisdiction: us,
     capacity_class: burst, cost: {{hourly_usd: 4.5}}, endpoints: [{_ep("us-0", ports["us-0"])}]}}
tenants:
  - {{name: t, api_keys: ["{hash_key(KEY)}"], region: eu-west, allowed_jurisdictions: [eu, us]}}
  - {{name: eu-only, api_keys: ["{hash_key("sk-eu")}"], region: eu-west,
     allowed_jurisdictions: [eu]}}
"""
    _gw, runner, base = await _gateway(yaml)
    try:
        async with session.post(f"{base}/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200, await r.text()
            assert r.headers["x-inferplane-endpoint"] == "us-0"
            header = r.headers["x-inferplane-spillover"]
            rid = r.headers["x-inferplane-decision-id"]
        assert header.startswith("reason=outage; from=eu-west; to=us-east; preferred=eu-")
        assert "delta_rtt_ms=80.0" in header
        async with session.get(f"{base}/v1/decisions/{rid}") as r:
            rec = await r.json()
        assert rec["spillover"]["kind"] == "outage" and rec["spillover"]["to_region"] == "us-east"
        async with session.get(f"{base}/metrics") as r:
            text = await r.text()
        assert ('inferplane_spillovers_total{from_region="eu-west",reason="outage",'
                'to_region="us-east",workload_class="interactive"} 1.0') in text
        async with session.post(f"{base}/v1/chat/completions", json=CHAT,
                                headers={"Authorization": "Bearer sk-eu"}) as r:
            assert r.status == 503  # the EU-only tenant never leaves the EU
    finally:
        await runner.cleanup()
        for u in ups:
            await u.cleanup()


# -- kinds do their job by default (issue 10 item 4) ------------------------------------------


def _kinds_fleet() -> Any:
    return config(
        sub("eu-gpu", n=2, cost={"hourly_usd": 2.8}),
        sub("us-gpu", region="us-east", jurisdiction="us", cost={"hourly_usd": 2.5}),
        sub("us-lpu", kind="low-latency", hardware="groq-lpu", region="us-east",
            jurisdiction="us", capacity="burst",
            cost={"input_per_mtok": 0.05, "output_per_mtok": 0.08},
            models=[{"name": "llama-3.1-8b", "max_context": 8192}]),
        sub("us-wse", kind="giant-context", hardware="cerebras-wse3", region="us-east",
            jurisdiction="us", capacity="burst",
            cost={"input_per_mtok": 0.10, "output_per_mtok": 0.10},
            models=[{"name": "llama-3.1-8b", "max_context": 131072}]),
        sub("us-api", kind="provider-api", hardware="provider-api", region="us-east",
            jurisdiction="us", capacity="burst",
            cost={"input_per_mtok": 0.18, "output_per_mtok": 0.18},
            models=[{"name": "llama-3.1-8b", "max_context": 131072, "precision": "fp8"}]),
        sub("de-sov", kind="sovereign-onprem", jurisdiction="eu-sovereign"),
    )


def _classified(cfg: Any, body: dict[str, Any], headers: Mapping[str, str],
                **tenant: Any) -> Any:
    from inferplane.config.schema import TenantSpec
    from inferplane.placement.classify import Classifier

    t = TenantSpec(name="t", api_keys=[hash_key("k")], region="eu-west", **tenant)
    prof, _ = Classifier(cfg).classify(request_id="r", api="chat", body=body, headers=headers,
                                       tenant=t)
    return prof


def test_a_prompt_beyond_the_gpu_pools_goes_to_giant_context_without_a_class_header() -> None:
    cfg = _kinds_fleet()
    words = " ".join(["tok"] * 40_000)
    body = {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": words}],
            "max_tokens": 64}
    prof = _classified(cfg.model_copy(update={"gateway": cfg.gateway.model_copy(
        update={"token_estimate": "words"})}), body, {})
    assert prof.workload_class == "long-context" and prof.prompt_tokens == 40_000
    assert prof.preferred_kinds == frozenset({"giant-context"})
    d = place(prof, snapshot(Fleet.from_config(cfg)), policies(cfg)["default"])
    assert d.endpoint == "us-wse-0"  # not the provider API that also has the context
    assert d.candidate("eu-gpu-0").rejected_by == "context-window"
    assert d.spillover is None  # nothing preferred could hold it: not a departure
    short = {**body, "messages": [{"role": "user", "content": "hello there"}]}
    assert _classified(cfg, short, {}).workload_class == "interactive"


def test_agent_steps_prefer_low_latency_silicon_where_it_meets_the_slo() -> None:
    cfg = _kinds_fleet()
    body = {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "next step"}],
            "max_tokens": 64}
    prof = _classified(cfg, body, {"x-inferplane-agent-step": "3",
                                   "x-inferplane-class": "agent-step"})
    assert prof.preferred_kinds == frozenset({"low-latency"})
    fl = Fleet.from_config(cfg)
    d = place(prof, snapshot(fl), policies(cfg)["default"])
    assert d.endpoint == "us-lpu-0" and any("prefers low-latency" in n for n in d.notes)
    assert d.spillover is None  # a preferred endpoint met the SLO: the move is policy
    # the low-latency endpoint far past its SLO: the reserved GPU serves the step
    busy = {"us-lpu-0": state(waiting=5000.0, running=64.0, inflight=64, inflight_tokens=10**6)}
    d = place(prof, snapshot(fl, busy), policies(cfg)["default"])
    assert d.endpoint != "us-lpu-0"


def test_the_sovereign_tenant_stays_on_sovereign_onprem() -> None:
    cfg = _kinds_fleet()
    body = {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "hello"}]}
    prof = _classified(cfg, body, {"x-inferplane-class": "sovereign"},
                       allowed_jurisdictions=["eu-sovereign"])
    fl = Fleet.from_config(cfg)
    d = place(prof, snapshot(fl), policies(cfg)["default"])
    assert d.endpoint == "de-sov-0"
    d = place(prof, snapshot(fl, {"de-sov-0": state(healthy=False)}), policies(cfg)["default"])
    assert d.picked is None  # down: a 503, never another jurisdiction
