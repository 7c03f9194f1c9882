"""The scraper asks a vLLM engine for only the samples it reads (`gateway.scrape_filter`).

A loopback server plays vLLM 0.32's two routes: ``/metrics`` renders the whole page whatever the
query (prometheus-fastapi-instrumentator's route), ``/metrics/`` serves only the samples that
``name[]`` names (prometheus_client's app; `twin.emulator.metrics.restricted`, which the
emulator serves there too). Other modes play servers without the filtered route."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from inferplane.config.loader import parse_config
from inferplane.config.schema import GatewaySpec
from inferplane.fleet.engine_metrics import parse_vllm, sample_names
from inferplane.fleet.model import Endpoint, Fleet
from inferplane.fleet.scraper import HttpMetricsSource
from inferplane.twin.emulator.metrics import restricted

PAGE = (Path(__file__).parent / "fixtures" / "metrics" / "vllm.txt").read_text()


class Engine:
    """``mode``: "vllm" (both routes), "404" (no ``/metrics/``), "redirect" (``/metrics/``
    redirects to ``/metrics``), "unfiltered" (``/metrics/`` ignores the query), "empty"
    (``/metrics/`` answers an empty page)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.hits: Counter[str] = Counter()
        self.page = PAGE
        self.runner: web.AppRunner | None = None
        self.url = ""

    @web.middleware
    async def count(self, request: web.Request, handler: object) -> web.StreamResponse:
        self.hits[request.path] += 1
        return await handler(request)  # type: ignore[operator,no-any-return]

    async def whole(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=self.page)

    async def filtered(self, request: web.Request) -> web.StreamResponse:
        if self.mode == "redirect":
            raise web.HTTPTemporaryRedirect("/metrics?" + request.query_string)
        if self.mode == "unfiltered":
            return web.Response(text=self.page)
        if self.mode == "empty":
            return web.Response(text="")
        names = request.query.getall("name[]", [])
        return web.Response(text=restricted(self.page, names) if names else self.page)

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
    cfg = parse_config(f"""
substrates:
  - {{name: pool, kind: gpu, hardware: h100, region: r1, jurisdiction: eu,
     cost: {{hourly_usd: 1.0}},
     endpoints: [{{name: e, url: "{url}", engine: {engine},
                  models: [{{name: m, profile: llama-3.1-8b, max_context: 4096}}]}}]}}
""")
    (ep,) = Fleet.from_config(cfg).endpoints
    return ep


def test_the_filtered_page_parses_as_the_whole_page() -> None:
    names = sample_names("vllm")
    assert names is not None and names[0] == "vllm:num_requests_running"
    small = restricted(PAGE, names)
    assert len(small) < len(PAGE) / 3, (len(small), len(PAGE))
    assert parse_vllm(small) == parse_vllm(PAGE)
    assert "_bucket" not in small
    assert sample_names("sglang") is None and sample_names("openai-compatible") is None


async def test_a_vllm_engine_is_scraped_on_its_filtered_page() -> None:
    async with Engine("vllm") as eng, aiohttp.ClientSession() as s:
        src, ep = HttpMetricsSource(s), endpoint(eng.url)
        texts = [await src.metrics(ep) for _ in range(3)]
        assert eng.hits == {"/metrics/": 3}
        assert all(t is not None and parse_vllm(t) == parse_vllm(PAGE) for t in texts)


@pytest.mark.parametrize("mode", ["404", "redirect", "unfiltered", "empty"])
async def test_an_engine_without_the_filter_is_read_whole_after_one_try(mode: str) -> None:
    async with Engine(mode) as eng, aiohttp.ClientSession() as s:
        src, ep = HttpMetricsSource(s), endpoint(eng.url)
        texts = [await src.metrics(ep) for _ in range(3)]
        assert all(t is not None and parse_vllm(t) == parse_vllm(PAGE) for t in texts)
        if mode == "unfiltered":
            # it answers /metrics/ with everything: that is the page, the path is kept
            assert eng.hits == {"/metrics/": 3}
        else:
            assert eng.hits == {"/metrics/": 1, "/metrics": 3}


async def test_a_filtered_page_that_loses_the_gauge_falls_back_for_good() -> None:
    async with Engine("vllm") as eng, aiohttp.ClientSession() as s:
        src, ep = HttpMetricsSource(s), endpoint(eng.url)
        assert await src.metrics(ep) is not None
        eng.mode = "empty"  # an engine replaced by one whose /metrics/ serves nothing useful
        text = await src.metrics(ep)
        assert text is not None and parse_vllm(text) == parse_vllm(PAGE)
        assert await src.metrics(ep) is not None
        assert eng.hits == {"/metrics/": 2, "/metrics": 2}


async def test_an_unanswered_filtered_scrape_decides_nothing() -> None:
    async with aiohttp.ClientSession() as s:
        eng = Engine("vllm")
        async with eng:
            url = eng.url
        src, ep = HttpMetricsSource(s, timeout_s=0.5), endpoint(url)
        assert await src.metrics(ep) is None  # refused: nothing listens any more
        assert src._paths == {}


@pytest.mark.parametrize(("engine", "flag"), [("vllm", False), ("sglang", True)])
async def test_whole_page_when_off_or_for_other_engines(engine: str, flag: bool) -> None:
    async with Engine("vllm") as eng, aiohttp.ClientSession() as s:
        src, ep = HttpMetricsSource(s, filter_samples=flag), endpoint(eng.url, engine)
        assert await src.metrics(ep) == PAGE
        assert eng.hits == {"/metrics": 1}


def test_the_config_switch() -> None:
    assert GatewaySpec().scrape_filter is True
    assert GatewaySpec(scrape_filter=False).scrape_filter is False
