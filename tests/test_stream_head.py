"""A relayed stream's head leaves with its first token, in one send (`api.app.HeadWithFirstChunk`),
through the real gateway over loopback; and it still leaves at once when the engine's first
chunk gives the client nothing to relay yet."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import http_writer, web

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from tests.builders import pool_fleet, tenant, to_yaml
from tests.support.procs import free_port

KEY = "sk-head"
TOKEN = b'data: {"choices":[{"index":0,"text":"t0","finish_reason":null}]}\n\n'


@dataclass
class Engine:
    """What the stand-in sends first (TOKEN or the start of it), and when it may go on."""

    first: bytes = TOKEN
    go: asyncio.Event = field(default_factory=asyncio.Event)


ENGINE: web.AppKey[Engine] = web.AppKey("engine", Engine)


async def _engine(request: web.Request) -> web.StreamResponse:
    """Writes the engine's first bytes, waits until the test lets it go on (at most 10 s), then
    the rest of TOKEN, a last token, the usage chunk and [DONE]."""
    engine = request.app[ENGINE]
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(engine.first)
    await asyncio.wait_for(engine.go.wait(), 10)
    last = {"choices": [{"index": 0, "text": "t1", "finish_reason": "length"}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2,
                                      "total_tokens": 3}}
    rest = TOKEN[len(engine.first):]
    await resp.write(rest + b"data: " + orjson.dumps(last) + b"\n\ndata: "
                     + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="")


@pytest.fixture
async def stack() -> AsyncIterator[tuple[Engine, str]]:
    """An engine stand-in and a gateway in front of it; yields the stand-in's `Engine` and the
    gateway's URL."""
    engine = Engine()
    app = web.Application()
    app[ENGINE] = engine
    app.router.add_post("/v1/completions", _engine)
    app.router.add_get("/health", _health)
    up = web.AppRunner(app)
    await up.setup()
    up_port, gw_port = free_port(), free_port()
    await web.TCPSite(up, "127.0.0.1", up_port).start()
    gw = Gateway(parse_config(to_yaml(pool_fleet(
        up_port, tenants=[tenant("t", KEY)],
        endpoint_fields={"name": "e", "scrape_metrics": False},
        gateway={"port": gw_port, "scrape_interval_s": 60, "health_interval_s": 60}))))
    runner = await serve(gw, "127.0.0.1", gw_port)
    try:
        yield engine, f"http://127.0.0.1:{gw_port}"
    finally:
        engine.go.set()
        await runner.cleanup()
        await up.cleanup()


BODY = {"model": "m", "prompt": "a b", "max_tokens": 2, "stream": True}


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every send aiohttp's HTTP writers make (one ``_write`` or ``_writelines`` call each), in
    this process: the engine stand-in's and the gateway's."""
    sends: list[bytes] = []
    write, writelines = http_writer.StreamWriter._write, http_writer.StreamWriter._writelines

    def one(self: http_writer.StreamWriter, chunk: Any) -> None:
        sends.append(bytes(chunk))
        write(self, chunk)

    def many(self: http_writer.StreamWriter, chunks: Iterable[Any]) -> None:
        chunks = list(chunks)
        sends.append(b"".join(bytes(c) for c in chunks))
        writelines(self, chunks)

    monkeypatch.setattr(http_writer.StreamWriter, "_write", one)
    monkeypatch.setattr(http_writer.StreamWriter, "_writelines", many)
    return sends


async def test_the_head_and_the_first_token_leave_in_one_send(
    stack: tuple[Engine, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, base = stack
    sends = _spy(monkeypatch)
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s,
        s.post(base + "/v1/completions", json=BODY) as r,
    ):
        assert r.status == 200
        first = await asyncio.wait_for(r.content.readany(), 10)
        assert first == TOKEN
        # the gateway's head (it names the decision) went out in the send that carried the token
        heads = [b for b in sends if b"x-inferplane-decision-id" in b]
        assert len(heads) == 1
        assert heads[0].startswith(b"HTTP/1.1 200 OK\r\n")
        assert heads[0].endswith(b"\r\n\r\n" + b"%x\r\n" % len(TOKEN) + TOKEN + b"\r\n")
        engine.go.set()
        rest = await r.read()
    assert rest.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in first + rest  # the client did not ask for it


async def test_the_head_leaves_at_once_when_the_first_chunk_relays_nothing(
    stack: tuple[Engine, str],
) -> None:
    """The engine's first chunk is half an event, which the gateway holds back until its end
    (the client did not ask for usage, so whole events are checked for it): the client still
    gets the head while the engine waits."""
    engine, base = stack
    engine.first = TOKEN[:30]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
        # the head arrives while the engine is still held (10 s: a liveness bound)
        r = await asyncio.wait_for(s.post(base + "/v1/completions", json=BODY), 10)
        try:
            assert r.status == 200 and not engine.go.is_set()
            engine.go.set()
            body = await r.read()
        finally:
            r.release()
    assert body.startswith(TOKEN) and body.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in body
