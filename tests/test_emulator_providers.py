"""The emulator's provider mode: base path, key check, both dialects, rate limits with 429 +
Retry-After, network RTT; and the gateway in front of it (translation, 429 → ejection and a
rate_limited spillover), all in process over loopback."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import aiohttp
import pytest

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from inferplane.config.schema import FleetConfig
from inferplane.fleet.model import Endpoint
from inferplane.twin.emulator.server import EmulatorError, start_emulator
from tests.builders import endpoint, model, pool_fleet, to_yaml
from tests.support.procs import free_port

KEY = "sk-tenant"
OPENAI_KEY, ANTHROPIC_KEY = "sk-emu-openai", "sk-emu-anthropic"


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("EMU_OPENAI_KEY", OPENAI_KEY)
    monkeypatch.setenv("EMU_ANTHROPIC_KEY", ANTHROPIC_KEY)
    yield


def fleet(oa_port: int, an_port: int, gw_port: int = 0, rpm: int = 1000) -> FleetConfig:
    return parse_config(to_yaml(pool_fleet(
        gateway={"port": gw_port, "seed": 2},
        substrate={"name": "hosted", "kind": "provider-api", "hardware": "provider-api",
                   "region": "us-east", "jurisdiction": "us", "capacity_class": "burst",
                   "cost": {"input_per_mtok": 1.0, "output_per_mtok": 1.0}},
        endpoints=[
            endpoint("oa", url=f"http://127.0.0.1:{oa_port}/openai/v1",
                     engine="openai-compatible", api_key_env="EMU_OPENAI_KEY",
                     models=[model(upstream_name="vendor/m-70b")],
                     emulation={"network_rtt_ms": 400, "rate_limit_rpm": rpm}),
            endpoint("an", an_port, engine="openai-compatible", dialect="anthropic",
                     api_key_env="EMU_ANTHROPIC_KEY", models=[model(upstream_name="claude-m")],
                     emulation={"network_rtt_ms": 0}),
        ],
        key=KEY,
    )))


@asynccontextmanager
async def emulated(config: FleetConfig) -> AsyncIterator[dict[str, str]]:
    handle = await start_emulator(config, time_scale=20.0)
    try:
        yield handle.urls
    finally:
        await handle.stop()


async def test_openai_provider_mode_base_path_key_rtt_and_429() -> None:
    oa, an = free_port(), free_port()
    async with emulated(fleet(oa, an, rpm=2)) as urls, aiohttp.ClientSession() as s:
        root = urls["oa"]
        chat = {"model": "vendor/m-70b", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3}
        async with s.post(f"{root}/openai/v1/chat/completions", json=chat) as r:
            assert r.status == 401
            assert (await r.json())["error"]["message"] == "Incorrect API key provided."
        auth = {"Authorization": f"Bearer {OPENAI_KEY}"}
        async with s.post(f"{root}/v1/chat/completions", json=chat, headers=auth) as r:
            assert r.status == 404  # the API lives under the base path only
        async with s.get(f"{root}/openai/v1/models", headers=auth) as r:
            assert [m["id"] for m in (await r.json())["data"]] == ["vendor/m-70b"]
        started = time.monotonic()
        async with s.post(f"{root}/openai/v1/chat/completions", json=chat, headers=auth) as r:
            body = await r.json()
        assert r.status == 200 and body["model"] == "vendor/m-70b"
        assert time.monotonic() - started >= 0.4 / 20 * 0.9  # the RTT, in engine time
        async with s.post(f"{root}/openai/v1/chat/completions", json=chat, headers=auth) as r:
            assert r.status == 200
        async with s.post(f"{root}/openai/v1/chat/completions", json=chat, headers=auth) as r:
            assert r.status == 429  # the third request in a minute
            assert int(r.headers["Retry-After"]) >= 1
        async with s.get(f"{root}/health") as r:  # operational routes need no key
            assert r.status == 200


async def test_anthropic_provider_mode_plain_stream_and_errors() -> None:
    oa, an = free_port(), free_port()
    async with emulated(fleet(oa, an)) as urls, aiohttp.ClientSession() as s:
        url = f"{urls['an']}/v1/messages"
        msg = {"model": "claude-m", "max_tokens": 4, "system": "be brief",
               "messages": [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}]}
        async with s.post(url, json=msg, headers={"x-api-key": "wrong",
                                                  "anthropic-version": "2023-06-01"}) as r:
            assert r.status == 401
            assert await r.json() == {"type": "error", "error": {
                "type": "authentication_error", "message": "invalid x-api-key"}}
        h = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}
        async with s.post(url, json=msg, headers=h) as r:
            out = await r.json()
        assert out["type"] == "message" and out["model"] == "claude-m"
        assert out["stop_reason"] == "max_tokens" and len(out["content"][0]["text"].split()) == 4
        assert out["usage"]["output_tokens"] == 4
        assert out["usage"]["input_tokens"] + out["usage"]["cache_read_input_tokens"] == 4
        async with s.post(url, json={**msg, "stream": True}, headers=h) as r:
            text = (await r.read()).decode()
        kinds = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
        assert kinds[:3] == ["message_start", "content_block_start", "ping"]
        assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
        assert kinds.count("content_block_delta") == 4
        async with s.post(url, json={"model": "claude-m", "messages": msg["messages"]},
                          headers=h) as r:
            assert r.status == 400
            err = await r.json()
        assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
        assert "max_tokens" in err["error"]["message"]


async def test_missing_key_variable_stops_the_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMU_ANTHROPIC_KEY")
    with pytest.raises(EmulatorError, match=r"'an'.*EMU_ANTHROPIC_KEY"):
        await start_emulator(fleet(free_port(), free_port()))


async def test_gateway_in_front_of_emulated_providers() -> None:
    oa, an, gw_port = free_port(), free_port(), free_port()
    config = fleet(oa, an, gw_port, rpm=1)
    async with emulated(config):
        gw = Gateway(config)
        runner = await serve(gw, "127.0.0.1", gw_port)
        base = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
        try:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
                gw.live.live["an"].inflight = 50  # load: `oa` is the first choice
                picks, records = [], []
                for i in range(3):
                    if i == 2:
                        gw.live.live["an"].inflight = 0
                    body = {"model": "m", "max_tokens": 3, "stream": i == 1,
                            "messages": [{"role": "user", "content": f"question {i}"}]}
                    async with s.post(base, json=body) as r:
                        assert r.status == 200, await r.text()
                        raw = (await r.read()).decode()
                        picks.append((r.headers["x-inferplane-endpoint"],
                                      r.headers["x-inferplane-model"]))
                        records.append(gw.ledger.get(r.headers["x-inferplane-decision-id"]))
                    if i == 1:  # streamed: OpenAI chunks although the upstream spoke Messages
                        assert raw.rstrip().endswith("data: [DONE]")
                        chunks = [json.loads(line[6:]) for line in raw.splitlines()
                                  if line.startswith("data: {")]
                        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
                        text = "".join(c["choices"][0]["delta"].get("content") or ""
                                       for c in chunks if c["choices"])
                        assert len(text.split()) == 3
                # `oa` accepts 1 request a minute: the second got 429 and moved to `an`
                assert picks == [("oa", "vendor/m-70b"), ("an", "claude-m"), ("an", "claude-m")]
                assert records[0] is not None and records[0]["spillover"] is None
                assert records[1] is not None and records[1]["outcome"]["status"] == 200
                assert records[1]["spillover"]["kind"] == "rate_limited"
                assert list(records[1]["outcome"]["failed_endpoints"]) == ["oa"]
                state = gw.live.snapshot().by_name["oa"].state
                assert state.ejected and state.ejected_reason.startswith("rate limited: HTTP 429")
        finally:
            await runner.cleanup()


async def test_tool_calls_through_the_gateway_to_an_emulated_messages_api() -> None:
    import openai

    oa, an, gw_port = free_port(), free_port(), free_port()
    config = fleet(oa, an, gw_port)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}}}}}]
    async with emulated(config):
        gw = Gateway(config)
        runner = await serve(gw, "127.0.0.1", gw_port)
        try:
            gw.live.live["oa"].inflight = 60  # `an`, the Messages endpoint, is the pick
            async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw_port}/v1",
                                          api_key=KEY, max_retries=0) as client:
                ask = {"model": "m", "max_tokens": 4, "tools": tools, "tool_choice": "required",
                       "messages": [{"role": "user", "content": "find it"}]}
                out = await client.chat.completions.create(**ask)  # type: ignore[call-overload]
                choice = out.choices[0]
                assert choice.finish_reason == "tool_calls"
                call = choice.message.tool_calls[0]
                assert call.function.name == "lookup"
                assert len(json.loads(call.function.arguments)["text"].split()) == 4
                stream = await client.chat.completions.create(**ask, stream=True)  # type: ignore[call-overload]
                chunks = [c async for c in stream]
            calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
            assert calls[0].function.name == "lookup" and calls[0].id.startswith("toolu_")
            args = "".join(tc.function.arguments or "" for tc in calls)
            assert len(json.loads(args)["text"].split()) == 4
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        finally:
            await runner.cleanup()


def _engine_at(base: str) -> tuple[FleetConfig, Endpoint, int]:
    """A fleet of one engine endpoint (health_check `health`, scraped, with a key) whose URL
    has the base path ``base``."""
    from inferplane.fleet.model import Fleet

    port = free_port()
    config = parse_config(to_yaml(pool_fleet(
        endpoints=[endpoint("e", url=f"http://127.0.0.1:{port}{base}",
                            api_key_env="EMU_OPENAI_KEY")],
    )))
    ep = Fleet.from_config(config).by_name["e"]
    assert ep.health_check == "health" and ep.scrape_metrics
    return config, ep, port


@pytest.mark.parametrize("base", ["/proxy", "/proxy/engine-a"])
async def test_emulated_engine_with_a_base_path_passes_the_gateways_probe_and_scrape(
    base: str
) -> None:
    """An engine behind a path-prefix proxy (``/proxy/*`` → ``/*``): the gateway probes
    ``<url>/health`` and scrapes ``<url>/metrics`` (and ``<url>/metrics/?name[]=…``), so the
    emulator serves both under the base path as well as at the root, without the endpoint's
    key, as the operational routes at the root."""
    from inferplane.fleet.scraper import HttpMetricsSource

    config, ep, port = _engine_at(base)
    async with emulated(config), aiohttp.ClientSession() as s:
        src = HttpMetricsSource(s)
        assert await src.healthy(ep)
        page = await src.metrics(ep)
        assert page is not None and "vllm:num_requests_running" in page
        path = src.path_of(ep)
        assert path is not None and path.startswith("/metrics/?")  # the filtered page answered
        for path in ("/health", "/metrics"):  # the root still answers
            async with s.get(f"http://127.0.0.1:{port}{path}") as r:
                assert r.status == 200, path
        async with s.get(f"http://127.0.0.1:{port}{base}/version") as r:
            assert r.status == 401  # only /health and /metrics are under the base path


@pytest.mark.parametrize("base", ["/v1", "/openai/v1"])
async def test_emulated_engine_whose_url_ends_in_v1_fails_the_probe_as_a_real_one(
    base: str
) -> None:
    """The OpenAI ``base_url`` habit on an engine endpoint (``http://host:8000/v1``): the API
    works (no second ``/v1``), but the gateway probes ``…/v1/health`` and scrapes
    ``…/v1/metrics``, which vLLM (or a proxy mapping ``/openai/*`` → ``/*``) does not serve: nor
    does the emulator (404; 401 here, from the key check on the API paths, as vLLM's with
    ``--api-key``), so the endpoint stays down here as against the real engine, and `inferplane
    check` says why (test_serve_memory.py). The proxy's ``/openai/health`` answers."""
    from inferplane.fleet.scraper import HttpMetricsSource

    config, ep, port = _engine_at(base)
    async with emulated(config), aiohttp.ClientSession() as s:
        src = HttpMetricsSource(s)
        assert not await src.healthy(ep)
        assert await src.metrics(ep) is None
        prefix = base.removesuffix("/v1")
        async with s.get(f"http://127.0.0.1:{port}{prefix}/health") as r:
            assert r.status == 200
        key = {"Authorization": f"Bearer {OPENAI_KEY}"}
        async with s.get(ep.api_url("/v1/models"), headers=key) as r:
            assert r.status == 200  # the API is where the gateway sends it
