"""The gateway's upstream connections: requests, scrapes and health probes share one keep-alive
pool, so a gateway in front of an engine opens a handful of connections, not one per request.

An in-process gateway in front of a loopback fake upstream (`tests.support.fake_upstream`) that
notes the peer address of every request it serves: one distinct peer is one TCP connection.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
import pytest
from aiohttp import web

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from tests.builders import pool_fleet, to_yaml
from tests.support.fake_upstream import build
from tests.support.loopback import engine_app, serve_on_loopback
from tests.support.procs import free_port

KEY = "sk-pool"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}
PEERS = web.AppKey("peers", dict)


@web.middleware
async def _note_peer(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    assert request.transport is not None
    peer = request.transport.get_extra_info("peername")
    request.app[PEERS].setdefault(peer, []).append(f"{request.method} {request.path}")
    return await handler(request)


async def _upstream() -> tuple[web.AppRunner, int, dict[object, list[str]]]:
    app = build("up", "ok", 0.0)
    app[PEERS] = peers = {}
    app.middlewares.append(_note_peer)
    runner, port = await serve_on_loopback(app, handler_cancellation=True)
    return runner, port, peers


def _config(port: int, gw_port: int) -> str:
    return to_yaml(pool_fleet(
        port, substrate={"cost": {"hourly_usd": 3.0}},
        endpoint_fields={"name": "e0", "engine": "vllm"},
        gateway={"port": gw_port, "health_interval_s": 0.1}, key=KEY))


@pytest.mark.parametrize("stream", [True, False])
async def test_requests_scrapes_and_probes_reuse_a_few_connections(stream: bool) -> None:
    """30 requests one after another (a 20 ms pause between them, far below any keep-alive
    limit), with the scrapes and health probes running: the upstream sees at most 3 connections
    in all, not one per request (a pool that closed its connections would show 30+)."""
    up, port, peers = await _upstream()
    gw_port = free_port()
    gw = Gateway(parse_config(_config(port, gw_port)))
    runner = await serve(gw, "127.0.0.1", gw_port)
    try:
        async with aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {KEY}"}, timeout=aiohttp.ClientTimeout(total=20)
        ) as client:
            for _ in range(30):
                async with client.post(f"http://127.0.0.1:{gw_port}/v1/chat/completions",
                                       json={**CHAT, "stream": stream}) as r:
                    assert r.status == 200, await r.text()
                    await r.read()
                await asyncio.sleep(0.02)
    finally:
        await runner.cleanup()
        await up.cleanup()
    served = [x for seen in peers.values() for x in seen]
    assert served.count("POST /v1/chat/completions") == 30
    assert any(x == "GET /metrics" for x in served) and any(x == "GET /health" for x in served)
    with_requests = [p for p, seen in peers.items() if "POST /v1/chat/completions" in seen]
    assert len(peers) <= 3, {str(p): len(seen) for p, seen in peers.items()}
    # the probes ride the requests' connections: one pool for both
    assert any("GET /health" in peers[p] for p in with_requests)


# -- content coding: the gateway reads what it relays, so it asks for none -------------------

PAGE = (b"# TYPE vllm:num_requests_waiting gauge\n"
        b'vllm:num_requests_waiting{engine="0",model_name="m"} 7.0\n')
ANSWER = orjson.dumps({
    "id": "x", "object": "chat.completion", "created": 0, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})


def _encoded(request: web.Request, body: bytes, content_type: str) -> web.Response:
    """``body`` gzipped when the request accepts gzip, as prometheus_client's ``/metrics``
    (SGLang's) and compressing proxies and hosted APIs answer."""
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        return web.Response(body=gzip.compress(body), content_type=content_type,
                            headers={"Content-Encoding": "gzip"})
    return web.Response(body=body, content_type=content_type)


async def test_scrapes_and_answers_are_read_from_an_upstream_that_compresses() -> None:
    """An upstream that gzips whatever the request accepts: the gateway's scrape still reads
    the engine's metrics and its client gets the JSON answer, not a 502 "not JSON"."""
    async def chat(request: web.Request) -> web.Response:
        return _encoded(request, ANSWER, "application/json")

    async def metrics(request: web.Request) -> web.Response:
        return _encoded(request, PAGE, "text/plain")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")

    up, port = await serve_on_loopback(engine_app(chat, metrics, health))
    gw_port = free_port()
    gw = Gateway(parse_config(_config(port, gw_port)))
    runner = await serve(gw, "127.0.0.1", gw_port)
    try:
        assert gw.live.live["e0"].metrics is not None  # the first scrape ran at start-up
        assert gw.live.live["e0"].metrics.waiting == 7
        async with aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {KEY}"}, timeout=aiohttp.ClientTimeout(total=20)
        ) as client, client.post(f"http://127.0.0.1:{gw_port}/v1/chat/completions",
                                 json=CHAT) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["choices"][0]["message"]["content"] == "hi"
    finally:
        await runner.cleanup()
        await up.cleanup()
