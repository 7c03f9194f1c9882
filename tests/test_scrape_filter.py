"""The scraper asks a vLLM engine for only the samples it reads (`gateway.scrape_filter`).

A loopback server plays vLLM 0.32's two routes from a real prometheus_client registry holding
vLLM's series (gauges, counters, histograms, the cache_config_info gauge): ``/metrics`` renders
the whole registry whatever the query (prometheus-fastapi-instrumentator's route),
``/metrics/`` is prometheus_client's own handler, which serves only the samples ``name[]``
names. Other modes play servers without the filtered route, a multiprocess-style registry
that cannot filter, a node agent that merges DCGM power into ``/metrics`` only, and failures."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.aiohttp import make_aiohttp_handler

from inferplane.config.loader import parse_config
from inferplane.config.schema import GatewaySpec
from inferplane.fleet.engine_metrics import (
    EngineMetrics,
    parse_vllm,
    sample_names,
    sample_names_on,
)
from inferplane.fleet.model import Endpoint, Fleet
from inferplane.fleet.scraper import HttpMetricsSource
from inferplane.twin.emulator.metrics import restricted
from tests.builders import model, pool_fleet, to_yaml

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"
DCGM = 'DCGM_FI_DEV_POWER_USAGE{gpu="0"} 312.5\n'
LABELS = {"engine": "0", "model_name": "m"}


def vllm_registry() -> CollectorRegistry:
    """vLLM's series the parser reads (and one it does not), in a real registry."""
    reg = CollectorRegistry()
    names = list(LABELS)
    Gauge("vllm:num_requests_running", "running", names, registry=reg).labels(**LABELS).set(3)
    Gauge("vllm:num_requests_waiting", "waiting", names, registry=reg).labels(**LABELS).set(1)
    Gauge("vllm:kv_cache_usage_perc", "kv", names, registry=reg).labels(**LABELS).set(0.25)
    for name, value in (("vllm:prefix_cache_queries", 100), ("vllm:prefix_cache_hits", 40),
                        ("vllm:num_preemptions", 0), ("vllm:prompt_tokens", 100),
                        ("vllm:generation_tokens", 16)):
        PromCounter(name, name, names, registry=reg).labels(**LABELS).inc(value)
    for name in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds"):
        h = Histogram(name, name, names, registry=reg).labels(**LABELS)
        h.observe(0.05)
        h.observe(0.2)
    Gauge("vllm:cache_config_info", "cache", ["block_size", "num_gpu_blocks", "engine"],
          registry=reg).labels(block_size="16", num_gpu_blocks="1024", engine="0").set(1)
    return reg


class MultiProcessLike:
    """A collector without ``describe`` (as prometheus_client's MultiProcessCollector): a
    restricted registry never finds it by name, so the filtered page is empty."""

    def collect(self):  # type: ignore[no-untyped-def]
        yield from vllm_registry().collect()


class Engine:
    """``mode``: "vllm" (both routes), "404" (no ``/metrics/``), "redirect" (``/metrics/``
    redirects to ``/metrics``), "multiprocess" (``/metrics/`` filters nothing out: empty),
    "agent" (a node agent adds DCGM power to ``/metrics`` only), "503" (``/metrics/``
    answers 503), "stall" (``/metrics/`` answers after 1 s)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.hits: Counter[str] = Counter()
        self.encodings: set[str | None] = set()
        self.registry = vllm_registry()
        self.runner: web.AppRunner | None = None
        self.url = ""

    @web.middleware
    async def count(
        self, request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        self.hits[request.path] += 1
        self.encodings.add(request.headers.get("Accept-Encoding"))
        return await handler(request)

    def page(self) -> str:
        text = generate_latest(self.registry).decode()
        return text + DCGM if self.mode == "agent" else text

    async def whole(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=self.page())

    async def filtered(self, request: web.Request) -> web.StreamResponse:
        if self.mode == "redirect":
            raise web.HTTPTemporaryRedirect("/metrics?" + request.query_string)
        if self.mode == "503":
            return web.Response(status=503, text="busy")
        if self.mode == "gone":
            return web.Response(status=404, text="not here")
        if self.mode == "stall":
            await asyncio.sleep(1.0)
        if self.mode == "multiprocess":
            reg = CollectorRegistry()
            reg.register(MultiProcessLike())  # type: ignore[arg-type]
            return await make_aiohttp_handler(reg)(request)
        return await make_aiohttp_handler(self.registry)(request)

    async def __aenter__(self) -> Engine:
        app = web.Application(middlewares=[self.count])
        app.router.add_get("/metrics", self.whole)
        if self.mode != "404":
            app.router.add_get("/metrics/", self.filtered)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def endpoint(url: str, engine: str = "vllm") -> Endpoint:
    cfg = parse_config(to_yaml(pool_fleet(
        substrate={"cost": {"hourly_usd": 1.0}}, endpoint_fields={"url": url, "engine": engine},
        models=[model(max_context=4096)])))
    (ep,) = Fleet.from_config(cfg).endpoints
    return ep


def filled(m: EngineMetrics) -> set[str]:
    return {k for k in m.__slots__ if getattr(m, k) is not None}


@pytest.mark.parametrize("fixture", ["vllm.txt", "vllm_v0.txt"])
def test_the_filtered_page_parses_as_the_whole_page(fixture: str) -> None:
    page = (FIXTURES / fixture).read_text() + DCGM
    names = sample_names("vllm")
    assert names is not None and names[0] == "vllm:num_requests_running"
    whole = parse_vllm(page)
    assert {"running", "kv_usage", "block_size", "power_watts"} <= filled(whole)
    small = restricted(page, names)
    assert len(small) < len(page) / 3, (len(small), len(page))
    assert parse_vllm(small) == whole
    assert "_bucket" not in small
    assert sample_names("sglang") is None and sample_names("openai-compatible") is None


def test_prometheus_clients_filter_keeps_what_the_parser_reads() -> None:
    """The real filter (prometheus_client's restricted registry) against the parser."""
    reg = vllm_registry()
    names = sample_names("vllm")
    assert names is not None
    whole = generate_latest(reg).decode()
    small = generate_latest(reg.restricted_registry(names)).decode()  # type: ignore[arg-type]
    assert parse_vllm(small) == parse_vllm(whole)
    assert {"running", "waiting", "kv_usage", "prefix_queries_total", "block_size",
            "num_gpu_blocks", "ttft_mean_s", "itl_mean_s"} <= filled(parse_vllm(whole))
    assert "_bucket" not in small and "e2e_request_latency" not in small


async def test_a_vllm_engine_is_scraped_on_its_filtered_page() -> None:
    async with Engine("vllm") as eng, aiohttp.ClientSession() as s:
        src, ep = HttpMetricsSource(s), endpoint(eng.url)
        texts = [await src.metrics(ep) for _ in range(4)]
        # the decision reads both pages once; then the filtered page alone
        assert eng.hits == {"/metrics/": 4, "/metrics": 1}
        assert src.path_of(ep) is not None and src.path_of(ep).startswith("/metrics/?name")
        assert all(t is not None and parse_vllm(t) == parse_vllm(eng.page()) for t in texts)


def asked(path: str | None) -> list[str]:
    """The names a filtered path's query asks for."""
    from urllib.parse import parse_qs, urlsplit

    assert path is not None and path.startswith("/metrics/?"), path
    return parse_qs(urlsplit(path).query)["name[]"]


def test_the_names_a_page_carries() -> None:
    """Of the names the parser reads, those a page has samples of (in the parser's order, the
    running gauge first whatever the page): a page of one vLLM generation lacks the others'."""
    names = sample_names("vllm")
    assert names is not None
    page = (FIXTURES / "vllm.txt").read_text()
    assert sample_names_on("vllm", page) == tuple(
        n for n in names if n not in ("vllm:gpu_prefix_cache_hit_rate", "DCGM_FI_DEV_POWER_USAGE"))
    assert sample_names_on("vllm", page + DCGM) == tuple(
        n for n in names if n != "vllm:gpu_prefix_cache_hit_rate")
    reg = generate_latest(vllm_registry()).decode()
    assert sample_names_on("vllm", reg) == (
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_sum", "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_sum", "vllm:inter_token_latency_seconds_count",
        "vllm:cache_config_info")
    # a name only in a comment, or a longer name it begins, is not on the page
    assert sample_names_on("vllm", "# TYPE vllm:num_preemptions_total counter\n"
                           "vllm:num_requests_waiting_by_reason{r=\"x\"} 1\n") == (
        "vllm:num_requests_running",)
    assert sample_names_on("sglang", page) is None


async def test_the_filtered_query_asks_only_for_the_names_on_the_page() -> None:
    """Once decided, the filtered page is asked for the names the whole page carries: a vLLM
    0.32-like page has none of the older aliases, DCGM power nor time_per_output_token, and
    the narrowed page still parses as the whole page does."""
    async with Engine("vllm") as eng, aiohttp.ClientSession() as s:
        src, ep = HttpMetricsSource(s), endpoint(eng.url)
        await src.metrics(ep)
        got = asked(src.path_of(ep))
        assert got == list(sample_names_on("vllm", eng.page()) or ())
        assert len(got) == 13 and not [n for n in got if "gpu_" in n or "DCGM" in n
                                       or "time_per_output" in n]
        text = await src.metrics(ep)
        assert text is not None and parse_vllm(text) == parse_vllm(eng.page())
        assert eng.hits == {"/metrics/": 2, "/metrics": 1}


async def test_an_older_engines_names_are_kept_and_the_newer_dropped() -> None:
    """A page of an older vLLM (the ``gpu_`` names, no ``kv_cache_usage_perc``) is asked for
    its own names: its KV usage and prefix counters still come through the filtered page."""
    async with Engine("vllm") as eng, aiohttp.ClientSession() as s:
        reg = eng.registry = CollectorRegistry()
        names = list(LABELS)
        Gauge("vllm:num_requests_running", "r", names, registry=reg).labels(**LABELS).set(2)
        Gauge("vllm:gpu_cache_usage_perc", "kv", names, registry=reg).labels(**LABELS).set(0.5)
        for name in ("vllm:gpu_prefix_cache_queries", "vllm:gpu_prefix_cache_hits"):
            PromCounter(name, name, names, registry=reg).labels(**LABELS).inc(10)
        src, ep = HttpMetricsSource(s), endpoint(eng.url)
        await src.metrics(ep)
        assert asked(src.path_of(ep)) == [
            "vllm:num_requests_running", "vllm:gpu_cache_usage_perc",
            "vllm:gpu_prefix_cache_queries_total", "vllm:gpu_prefix_cache_hits_total"]
        text = await src.metrics(ep)
        assert text is not None
        got = parse_vllm(text)
        assert got == parse_vllm(eng.page())
        assert (got.kv_usage, got.prefix_queries_total) == (0.5, 10)


@pytest.mark.parametrize("mode", ["404", "redirect", "multiprocess", "agent"])
async def test_an_engine_without_a_full_filtered_page_is_read_whole(mode: str) -> None:
    async with Engine(mode) as eng, aiohttp.ClientSession() as s:
        src, ep = HttpMetricsSource(s), endpoint(eng.url)
        texts = [await src.metrics(ep) for _ in range(3)]
        assert all(t is not None and parse_vllm(t) == parse_vllm(eng.page()) for t in texts)
        assert src.path_of(ep) == "/metrics"
        assert eng.hits == {"/metrics/": 1, "/metrics": 3}
        if mode == "agent":  # the node agent's power reading survives
            assert parse_vllm(texts[-1]).power_watts == 312.5


async def test_the_decision_is_made_again_after_its_time() -> None:
    now = [0.0]
    async with Engine("gone") as eng, aiohttp.ClientSession() as s:
        src, ep = HttpMetricsSource(s, clock=lambda: now[0]), endpoint(eng.url)
        await src.metrics(ep)
        assert src.path_of(ep) == "/metrics"
        eng.mode = "vllm"  # the engine was upgraded behind the same URL
        await src.metrics(ep)
        assert src.path_of(ep) == "/metrics"  # the decision holds for its time
        now[0] = HttpMetricsSource.RECHECK_S + 1
        await src.metrics(ep)
        assert src.path_of(ep) is not None and src.path_of(ep).startswith("/metrics/?")


@pytest.mark.parametrize("mode", ["503", "stall"])
async def test_a_filtered_path_that_fails_for_now_decides_nothing(mode: str) -> None:
    async with Engine(mode) as eng, aiohttp.ClientSession() as s:
        src, ep = HttpMetricsSource(s, timeout_s=0.3), endpoint(eng.url)
        text = await src.metrics(ep)
        # this scrape reads the whole page; the path stays undecided
        assert text is not None and parse_vllm(text).running == 3
        assert src.path_of(ep) is None
        eng.mode = "vllm"
        await src.metrics(ep)
        assert src.path_of(ep) is not None and src.path_of(ep).startswith("/metrics/?")


async def test_a_filtered_page_that_loses_the_gauge_is_decided_again() -> None:
    async with Engine("vllm") as eng, aiohttp.ClientSession() as s:
        src, ep = HttpMetricsSource(s), endpoint(eng.url)
        await src.metrics(ep)
        assert src.path_of(ep) is not None and src.path_of(ep).startswith("/metrics/?")
        eng.mode = "multiprocess"  # an engine replaced by one that cannot filter
        text = await src.metrics(ep)
        assert text is not None and parse_vllm(text).running == 3
        assert src.path_of(ep) == "/metrics"


@pytest.mark.parametrize(("engine", "flag"), [("vllm", False), ("sglang", True)])
async def test_whole_page_when_off_or_for_other_engines(engine: str, flag: bool) -> None:
    async with Engine("vllm") as eng, aiohttp.ClientSession() as s:
        src, ep = HttpMetricsSource(s, filter_samples=flag), endpoint(eng.url, engine)
        assert await src.metrics(ep) == eng.page()
        assert eng.hits == {"/metrics": 1}


async def test_scrapes_ask_for_an_uncompressed_page() -> None:
    async with Engine("vllm") as eng, aiohttp.ClientSession() as s:
        src, ep = HttpMetricsSource(s), endpoint(eng.url)
        await src.metrics(ep)
        await src.metrics(ep)
    assert eng.encodings == {"identity"}


@pytest.mark.parametrize("flag", [True, False])
async def test_the_config_switch_reaches_both_scrapers(flag: bool) -> None:
    """`gateway.scrape_filter` is what the gateway's and the EPP's sources are built with."""
    from inferplane.api.pipeline import Gateway
    from inferplane.epp.server import Picker

    cfg = parse_config(to_yaml(pool_fleet(
        9, gateway={"scrape_filter": flag}, substrate={"cost": {"hourly_usd": 1.0}},
        endpoint_fields={"engine": "vllm"}, models=[model(max_context=4096)])))
    assert GatewaySpec().scrape_filter is True
    for core in (Gateway(cfg), Picker(cfg)):
        source = await core._start_transport()
        try:
            assert isinstance(source, HttpMetricsSource)
            assert source.filter_samples is flag, type(core).__name__
        finally:
            await core._stop_transport()


@pytest.mark.parametrize(("status", "engine"), [
    (404, "vllm"), (401, "vllm"), (403, "sglang"), (503, "vllm"), (None, "vllm"),
    (None, "sglang"), ("stall", "vllm"), ("body-stall", "vllm"), ("body-reset", "vllm"),
    ("body-stall", "sglang"), ("body-reset", "sglang")])
async def test_only_a_scrape_that_got_no_answer_counts_as_failed(
    status: int | str | None, engine: str
) -> None:
    """A page the server answered with a non-200 (an engine without ``/metrics``, a proxy
    that refuses it, a 503 under load) is read as no page, but the server answered: the
    scraper's serving skip does not count it as a failed scrape. Only no answer does
    (``None``: nothing listens; ``"stall"``: past the timeout; ``"body-stall"`` and
    ``"body-reset"``: a 200 status line and headers, then the page stalls past the timeout
    or the connection closes before it is all sent)."""
    from inferplane.fleet.live import LiveFleet
    from inferplane.fleet.scraper import Scraper
    from tests.support.procs import free_port

    async def answer(request: web.Request) -> web.StreamResponse:
        if status == "stall":
            await asyncio.sleep(1.0)
            return web.Response(text="")
        if status in ("body-stall", "body-reset"):
            resp = web.StreamResponse(status=200)
            resp.content_length = 100_000
            await resp.prepare(request)
            await resp.write(b"vllm:num_requests_running 3\n")
            if status == "body-reset":
                assert request.transport is not None
                request.transport.close()
            else:
                await asyncio.sleep(1.0)
            return resp
        assert isinstance(status, int)
        return web.Response(status=status, text="no")

    app = web.Application()
    app.router.add_get("/metrics", answer)
    app.router.add_get("/metrics/", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    if status is not None:
        await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as s:
            ep = endpoint(f"http://127.0.0.1:{port}", engine)
            src = HttpMetricsSource(s, timeout_s=0.3)
            live = LiveFleet(Fleet((ep,)), stale_after_s=2.0)
            scraper = Scraper(live, src)
            assert not await scraper.scrape_once(ep)
            answered = isinstance(status, int)
            assert src.unanswered(ep) is not answered
            assert (ep.name in scraper.scrape_failed_at) is not answered
    finally:
        await runner.cleanup()


async def test_a_reload_drops_the_answered_records_of_urls_gone() -> None:
    """The source's per-URL record of whether its last GET was answered does not outlive the
    endpoint: a reload that removes the URL (or moves the endpoint to another) drops it."""
    from inferplane.fleet.live import LiveFleet
    from inferplane.fleet.scraper import Scraper
    from tests.support.procs import free_port

    old, new = endpoint(f"http://127.0.0.1:{free_port()}"), endpoint("http://127.0.0.1:9")
    async with aiohttp.ClientSession() as s:
        src = HttpMetricsSource(s, timeout_s=0.3)
        live = LiveFleet(Fleet((old,)), stale_after_s=2.0)
        scraper = Scraper(live, src)
        await scraper.scrape_once(old)  # nothing listens: recorded as unanswered
        assert set(src._reached) == {old.url}
        live.reconfigure(Fleet((new,)))
        scraper.reconfigure()  # starts the new endpoint's loops: stopped below
        try:
            assert old.url not in src._reached
        finally:
            await scraper.stop()
