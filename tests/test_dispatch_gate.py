"""The dispatch gate (``admission.queue.max_prefill_queue_s``) on the live request path, in
process (`serve`) on loopback: a request whose first token the gateway cannot see (a
non-streamed answer, a batch line) holds its endpoint's prefill queue until its predicted TTFT,
not until its answer ends; and a reload recomputes the gate's prefill costs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from tests.support.held_upstream import KEY, HeldUpstream, config
from tests.support.procs import free_port


@dataclass
class Env:
    up: HeldUpstream
    base: str
    gw: Gateway
    http: aiohttp.ClientSession

    async def chat(self, prompt: str, **extra: Any) -> int:
        body = {"model": "m", "max_tokens": 5,
                "messages": [{"role": "user", "content": prompt}], **extra}
        async with self.http.post(self.base + "/v1/chat/completions", json=body) as r:
            await r.read()
            return r.status


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    up = HeldUpstream()
    up_runner = web.AppRunner(up.app())
    await up_runner.setup()
    up.port = free_port()
    await web.TCPSite(up_runner, "127.0.0.1", up.port).start()
    port = free_port()
    gw = Gateway(parse_config(config(up.port)))
    runner = await serve(gw, "127.0.0.1", port)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        try:
            yield Env(up, f"http://127.0.0.1:{port}", gw, http)
        finally:
            up.hold.set()
            await runner.cleanup()
            await up_runner.cleanup()


@pytest.mark.parametrize("stream", [False, True])
async def test_requests_without_a_seen_first_token_overlap_under_gate_zero(
    env: Env, stream: bool
) -> None:
    """Gate 0 (one prompt prefilling per endpoint): the second non-streamed request goes once
    the first's predicted TTFT has passed, while the first is still generating. ``stream``: a
    process that sees no chunks (the Envoy picker without its observer filter) times streamed
    requests the same way (the held upstream answers them whole)."""
    if stream:
        env.gw.sees_chunks = False
    first = asyncio.create_task(env.chat("a", stream=stream))
    assert await env.up.until(1) == ["a"]
    second = asyncio.create_task(env.chat("b", stream=stream))
    # "a" is still held at the upstream (its answer not sent): "b" reaches it all the same
    assert await env.up.until(2) == ["a", "b"]
    assert not first.done() and not second.done()
    rec = env.gw.live.live["up"]
    assert rec.inflight == 2
    env.up.hold.set()
    assert await first == 200 and await second == 200
    assert rec.pending_prefill == 0 and rec.pending_prefill_tokens == 0 and rec.inflight == 0


async def test_a_batch_line_does_not_gate_interactive_traffic_for_its_generation(
    env: Env,
) -> None:
    st_code, f = await _upload(env, _line("batch-1"))
    assert st_code == 200, f
    async with env.http.post(env.base + "/v1/batches", json={
        "input_file_id": f["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}) as r:
        assert r.status == 200, await r.text()
    assert await env.up.until(1) == ["batch-1"]
    interactive = asyncio.create_task(env.chat("live"))
    assert await env.up.until(2) == ["batch-1", "live"]  # the line still generating
    env.up.hold.set()
    assert await interactive == 200


async def _upload(env: Env, content: bytes) -> tuple[int, Any]:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", content, filename="in.jsonl", content_type="application/jsonl")
    async with env.http.post(env.base + "/v1/files", data=form) as r:
        return r.status, orjson.loads(await r.read())


def _line(cid: str) -> bytes:
    return orjson.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "m", "max_tokens": 5,
                                  "messages": [{"role": "user", "content": cid}]}}) + b"\n"


async def test_a_reload_with_new_hardware_recomputes_the_gates_prefill_cost(env: Env) -> None:
    adm = env.gw.admission
    before = adm._per_token(env.gw.fleet.by_name["up"], "m")
    assert before is not None
    await env.gw.reload(parse_config(config(env.up.port, hardware="l4")), "<reloaded>")
    after = adm._per_token(env.gw.fleet.by_name["up"], "m")
    assert after is not None and after > before * 2  # an L4 prefills far slower than an H100
