"""What `Scraper.scrapes` and `Scraper.probes` count (``inferplane_engine_scrapes_total``,
``inferplane_health_probes_total``), against a stand-in source that counts the calls made of it.

The fleet holds one endpoint of each kind: ``both`` (scraped and probed), ``passive``
(``health_check: passive``: scraped, never probed) and ``blind`` (``scrape_metrics: false``:
probed, never scraped). A scrape counts one (whatever the source's page requests: see the HTTP
case below), a probe sent counts one; the start-up prime's scrapes and probes count; a probe
``gateway.health_skip_while_serving`` skips and a reload's look at joining endpoints
(`Scraper.observe`) do not."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from inferplane.config.loader import parse_config
from inferplane.fleet.live import LiveFleet
from inferplane.fleet.model import Endpoint, Fleet
from inferplane.fleet.scraper import (
    HttpMetricsSource,
    Scraper,
    StaticMetricsSource,
    skip_window,
)
from tests.builders import endpoint, pool_fleet, to_yaml
from tests.test_scrape_filter import Engine


class CountingSource(StaticMetricsSource):
    """Answers an idle page and a passed probe, and counts each call by endpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics_calls: Counter[str] = Counter()
        self.healthy_calls: Counter[str] = Counter()

    async def metrics(self, endpoint: Endpoint) -> str | None:
        self.metrics_calls[endpoint.name] += 1
        return "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"

    async def healthy(self, endpoint: Endpoint) -> bool:
        self.healthy_calls[endpoint.name] += 1
        return True


def vllm_fleet(url: str) -> Fleet:
    """One vLLM endpoint at ``url`` (its page filtered: `HttpMetricsSource`)."""
    return Fleet.from_config(parse_config(to_yaml(pool_fleet(
        endpoint_fields={"url": url, "engine": "vllm"}))))


def three_kinds() -> LiveFleet:
    cfg = parse_config(to_yaml(pool_fleet(endpoints=[
        endpoint("both", 9001, engine="vllm"),
        endpoint("passive", 9002, engine="vllm", health_check="passive"),
        endpoint("blind", 9003, engine="vllm", scrape_metrics=False),
    ])))
    return LiveFleet(Fleet.from_config(cfg), stale_after_s=2.0)


async def scrape_each(s: Scraper) -> None:
    for e in s.live.fleet.endpoints:
        await s.scrape_once(e)


async def one_turn_of_the_loops(s: Scraper) -> None:
    """`Scraper.start`'s loops each run their first turn (the source answers at once), then
    wait out an interval of 100 s, during which they are stopped."""
    s.start()
    for _ in range(20):
        await asyncio.sleep(0)
    await s.stop()


async def serving_then_the_loops(s: Scraper) -> None:
    """Every endpoint answered a request with a 2xx: with the skip on, the health loops' first
    turn probes none of them."""
    for e in s.live.fleet.endpoints:
        s.live.observe_outcome(e.name, True)
    await one_turn_of_the_loops(s)


async def reload_look(s: Scraper) -> None:
    s.apply(await s.observe(s.live.fleet.endpoints))


Action = Callable[[Scraper], Awaitable[None]]


@pytest.mark.parametrize(
    ("action", "skip", "counted", "sent"),
    [
        # start-up: both and passive scraped, both and blind probed
        pytest.param(lambda s: s.prime(), False, (2, 2), (2, 2), id="prime"),
        pytest.param(scrape_each, False, (2, 0), (2, 0), id="scrape_once-each"),
        pytest.param(lambda s: s.probe_once(s.live.fleet.by_name["both"], 0), False,
                     (0, 1), (0, 1), id="probe_once"),
        # the loops: no scrape loop for blind, no health loop for passive
        pytest.param(one_turn_of_the_loops, False, (2, 2), (2, 2), id="loops"),
        # health_skip_while_serving: the scrapes go on, the skipped probes are not counted
        pytest.param(serving_then_the_loops, True, (2, 0), (2, 0), id="loops-skip-serving"),
        pytest.param(serving_then_the_loops, False, (2, 2), (2, 2), id="loops-no-skip"),
        # a reload's look at joining endpoints is sent, and not counted
        pytest.param(reload_look, False, (0, 0), (2, 2), id="reload-observe"),
    ],
)
async def test_what_the_scraper_counts(
    action: Action, skip: bool, counted: tuple[int, int], sent: tuple[int, int]
) -> None:
    live = three_kinds()
    source = CountingSource()
    scraper = Scraper(live, source, interval_s=100.0, health_interval_s=100.0,
                      skip_probe_while_serving=skip)
    await action(scraper)
    assert (scraper.scrapes, scraper.probes) == counted
    assert (sum(source.metrics_calls.values()), sum(source.healthy_calls.values())) == sent
    assert source.metrics_calls["blind"] == 0 and source.healthy_calls["passive"] == 0


async def test_a_scrape_counts_one_whatever_the_pages_it_asks_for() -> None:
    """Over HTTP, a scrape that decides the page's path (the first, then every RECHECK_S)
    asks for two pages (the filtered one and the whole one) and counts one: the counter
    counts scrapes, as its HELP and docs/observability.md say."""
    async with Engine("vllm") as eng, aiohttp.ClientSession() as http:
        live = LiveFleet(vllm_fleet(eng.url), stale_after_s=2.0)
        (ep,) = live.fleet.endpoints
        scraper = Scraper(live, HttpMetricsSource(http))
        for _ in range(3):
            assert await scraper.scrape_once(ep)
        assert scraper.scrapes == 3
        assert eng.hits == {"/metrics/": 3, "/metrics": 1}


@pytest.mark.parametrize(("window", "interval", "expected"), [
    (None, 1.0, 3.0), (None, 0.25, 0.75), (7.5, 0.25, 7.5), (0.1, 1.0, 0.1),
    # unset, capped as a number is (60 s), never under one probe period
    (None, 30.0, 60.0), (None, 80.0, 80.0), (60.0, 30.0, 60.0),
])
async def test_the_gateway_gives_its_scraper_the_skip_window(
    window: float | None, interval: float, expected: float
) -> None:
    """``gateway.health_skip_window_s`` reaches the gateway's scraper, with the skip and the
    probe period; unset, it is 3 probe periods (a config tuned for fast detection keeps a
    short window)."""
    from inferplane.api.app import serve
    from inferplane.api.pipeline import Gateway
    from tests.support.procs import free_port

    gateway: dict[str, float] = {"health_interval_s": interval}
    if window is not None:
        gateway["health_skip_window_s"] = window
    cfg = parse_config(to_yaml(pool_fleet(9001, gateway=gateway)))
    assert cfg.gateway.health_skip_window_s == window
    gw = Gateway(cfg, metrics_source=CountingSource())
    runner = await serve(gw, "127.0.0.1", free_port())
    try:
        scraper = gw.scraper
        assert scraper is not None and scraper.skip_probe_while_serving
        assert scraper.skip_window_s == pytest.approx(expected)
        assert scraper.health_interval_s == cfg.gateway.health_interval_s == interval
    finally:
        await runner.cleanup()


def test_the_scrapers_own_default_window_is_the_configs() -> None:
    """A `Scraper` built without a window takes the config's default: 3 probe periods."""
    cfg = parse_config(to_yaml(pool_fleet(9001, gateway={"health_interval_s": 0.1})))
    live = LiveFleet(Fleet.from_config(cfg), stale_after_s=2.0)
    scraper = Scraper(live, CountingSource(), health_interval_s=0.1)
    assert scraper.skip_window_s == pytest.approx(
        skip_window(cfg.gateway.health_skip_window_s, 0.1)) == pytest.approx(0.3)
