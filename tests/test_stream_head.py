"""A relayed stream's head leaves with its first token, in one send (`api.app.HeadWithFirstChunk`),
through the real gateway over loopback; it still leaves at once when the engine's first chunk
gives the client nothing to relay yet (half an event; a comment from an ``anthropic`` endpoint);
and a fault of the gateway's own after the head is prepared ends the stream with an error event,
well framed."""

from __future__ import annotations

import asyncio
import contextlib
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
from inferplane.dispatch import upstream
from tests.builders import pool_fleet, tenant, to_yaml
from tests.support.procs import free_port

KEY = "sk-head"
TOKEN = b'data: {"choices":[{"index":0,"text":"t0","finish_reason":null}]}\n\n'


@dataclass
class Engine:
    """What the stand-in sends first (TOKEN or the start of it), and when it may go on."""

    first: bytes = TOKEN
    go: asyncio.Event = field(default_factory=asyncio.Event)


def _messages_event(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


MESSAGES_REST = b"".join(_messages_event(e) for e in (
    {"type": "message_start", "message": {"id": "msg_1", "model": "m", "usage": {
        "input_tokens": 2, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "t0"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}},
    {"type": "message_stop"},
))


async def _messages(request: web.Request) -> web.StreamResponse:
    """An Anthropic Messages stream: a comment (the engine's first chunk, which translates to
    nothing), then, once the test lets it go on, a whole answer."""
    engine = request.app[ENGINE]
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b": ping\n\n")
    await asyncio.wait_for(engine.go.wait(), 10)
    await resp.write(MESSAGES_REST)
    await resp.write_eof()
    return resp


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


@contextlib.asynccontextmanager
async def _stack(**endpoint: Any) -> AsyncIterator[tuple[Engine, str]]:
    """An engine stand-in and a gateway in front of it (its endpoint with the fields of
    ``endpoint``); yields the stand-in's `Engine` and the gateway's URL."""
    engine = Engine()
    app = web.Application()
    app[ENGINE] = engine
    app.router.add_post("/v1/completions", _engine)
    app.router.add_post("/v1/messages", _messages)
    app.router.add_get("/health", _health)
    up = web.AppRunner(app)
    await up.setup()
    up_port, gw_port = free_port(), free_port()
    await web.TCPSite(up, "127.0.0.1", up_port).start()
    gw = Gateway(parse_config(to_yaml(pool_fleet(
        up_port, tenants=[tenant("t", KEY)],
        endpoint_fields={"name": "e", "scrape_metrics": False, **endpoint},
        gateway={"port": gw_port, "scrape_interval_s": 60, "health_interval_s": 60}))))
    runner = await serve(gw, "127.0.0.1", gw_port)
    try:
        yield engine, f"http://127.0.0.1:{gw_port}"
    finally:
        engine.go.set()
        await runner.cleanup()
        await up.cleanup()


@pytest.fixture
async def stack() -> AsyncIterator[tuple[Engine, str]]:
    async with _stack() as s:
        yield s


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


async def _head_while_held(engine: Engine, url: str, body: dict[str, Any]) -> bytes:
    """POST ``body``; check the answer's head arrives while the engine is still held (10 s: a
    liveness bound), then let the engine go on and return the whole body."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
        r = await asyncio.wait_for(s.post(url, json=body), 10)
        try:
            assert r.status == 200 and not engine.go.is_set()
            engine.go.set()
            return await r.read()
        finally:
            r.release()


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
    body = await _head_while_held(engine, base + "/v1/completions", BODY)
    assert body.startswith(TOKEN) and body.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in body


async def test_the_head_leaves_at_once_when_an_anthropic_first_chunk_translates_to_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_HEAD_KEY", "sk-upstream")
    chat = {"model": "m", "max_tokens": 2, "stream": True,
            "messages": [{"role": "user", "content": "a b"}]}
    async with _stack(
        engine="openai-compatible", dialect="anthropic", api_key_env="TEST_HEAD_KEY"
    ) as (engine, base):
        body = await _head_while_held(engine, base + "/v1/chat/completions", chat)
    assert b'"content":"t0"' in body and body.endswith(b"data: [DONE]\n\n")


async def test_a_fault_after_the_head_is_prepared_ends_the_stream_with_an_error_event(
    stack: tuple[Engine, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug of the gateway's own while relaying (here the usage filter raising) reaches the
    client as an error event in a well-framed stream, not as a second answer, and the
    connection can carry the next request."""
    engine, base = stack

    def broken(self: upstream.SSEUsageFilter, chunk: bytes) -> bytes:
        raise RuntimeError("planted")

    monkeypatch.setattr(upstream.SSEUsageFilter, "feed", broken)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
        async with s.post(base + "/v1/completions", json=BODY) as r:
            assert r.status == 200
            body = await asyncio.wait_for(r.read(), 10)
        event = orjson.loads(body.split(b"data: ", 1)[1].split(b"\n\n", 1)[0])
        assert event["error"]["type"] == "internal_error"
        assert "planted" not in body.decode()
        monkeypatch.undo()
        engine.go.set()
        async with s.post(base + "/v1/completions", json=BODY) as r:  # same connection
            assert r.status == 200
            assert (await asyncio.wait_for(r.read(), 10)).endswith(b"data: [DONE]\n\n")
