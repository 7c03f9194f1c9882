"""What a faulty upstream does to a relayed answer (audit26 S1, S5, S6, S7, N4), through an
in-process gateway over real HTTP on loopback, in front of a small upstream of this file's own
that misbehaves on request:

- an OpenAI-dialect stream that ends without ``data: [DONE]``, or sends a ``data:`` line that is
  not JSON, is a stream error (the client gets an error event, the record a 502), as a
  Messages stream without ``message_stop`` already was;
- a stream that stalls mid-way (or sends only keep-alive comments) is cut after
  ``gateway.stream_idle_timeout_s``;
- a non-streamed answer over ``gateway.max_upstream_body_bytes`` is a 502 naming the limit;
- an engine killed mid-stream is told as such (not "connection failed (ClientPayloadError)");
- each failure leaves one WARNING naming the endpoint, the reason and the decision id, at
  most one per endpoint per `lograte.INTERVAL_S`; a probe that stops answering, one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from inferplane.dispatch.answer import OpenAIEvents
from inferplane.dispatch.upstream import _IdleWatch
from inferplane.lograte import LogLimiter
from tests.builders import endpoint, pool_fleet, to_yaml
from tests.support.fake_upstream import WAITING, health, metrics
from tests.support.procs import free_port

KEY = "sk-faults"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
IDLE_S = 0.3
LIMIT = 100_000  # gateway.max_upstream_body_bytes in these tests
MODE = web.AppKey("mode", dict)  # {"mode": ...}: how the upstream misbehaves, set per test
BIG = 64 * 1024  # the text of one event in mode "big"
BIG_EVENTS = 200  # 12.8 MB in all: more than loopback's socket buffers hold


ENGINE_ERROR = {"error": {"message": "The decoder prompt cannot be empty", "type":
                          "BadRequestError", "param": None, "code": 400}}
"""What vLLM 0.32 sends as a stream's last event (``create_streaming_error_response``)."""
ENGINE_FAULT = {"error": {"message": "CUDA error: an illegal memory access was encountered",
                          "type": "InternalServerError", "param": None, "code": 500}}
"""The same event for the engine's own failure."""


def _event(i: int) -> bytes:
    return b"data: " + json.dumps({
        "id": "x", "object": "chat.completion.chunk", "model": "m",
        "choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}],
    }).encode() + b"\n\n"


def _huge() -> bytes:
    """A non-streamed answer twice `LIMIT`."""
    return json.dumps({"id": "x", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "x" * 2 * LIMIT},
         "finish_reason": "stop"}]}).encode()


VLLM_400 = {"error": {
    "message": "This model's maximum context length is 1024 tokens. However, your prompt "
               "contains at least 1025 input tokens, which exceeds this limit even without any "
               "output tokens. Please reduce the length of the input prompt. "
               "(parameter=input_tokens, value=1025)",
    "type": "BadRequestError", "param": "input_tokens", "code": 400}}
"""vLLM 0.32's answer to a chat prompt longer than the model's context, streamed or not (asked
of the real engine with --max-model-len 1024: harden27)."""
OPENAI_400 = {"error": {"message": "This model's maximum context length is 8192 tokens.",
                        "type": "invalid_request_error", "param": "messages",
                        "code": "context_length_exceeded"}}
"""OpenAI's own answer to the same: relayed byte for byte."""
AZURE_400 = {"error": {
    "message": "The response was filtered due to the prompt triggering Azure OpenAI's content "
               "management policy.",
    "type": None, "param": "prompt", "code": "content_filter", "status": 400,
    "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
        "hate": {"filtered": False, "severity": "safe"},
        "violence": {"filtered": True, "severity": "medium"}}}}}
"""Azure OpenAI's content filter refusal: its ``innererror`` (which category) reaches the client;
only the null ``type`` is given one."""
OPENROUTER_400 = {"error": {"code": 400, "message": "Provider returned error", "metadata": {
    "provider_name": "Together", "raw": '{"error":{"message":"bad logit_bias"}}'}},
    "user_id": "user_2x"}
"""OpenRouter's relay of a provider's refusal: ``metadata`` (the provider's own error) and the
``user_id`` beside ``error`` reach the client; the number ``code`` becomes null, a ``type`` is
added."""


async def chat(request: web.Request) -> web.StreamResponse:
    """Streams three events and ``[DONE]`` unless the mode says otherwise."""
    mode = request.app[MODE]["mode"]
    body = await request.json()
    if mode == "vllm-400":
        return web.json_response(VLLM_400, status=400)
    if mode == "openai-400":
        return web.Response(body=json.dumps(OPENAI_400, indent=1), status=400,
                            content_type="application/json")
    if mode == "azure-400":
        return web.json_response(AZURE_400, status=400)
    if mode == "openrouter-400":
        return web.json_response(OPENROUTER_400, status=400)
    if not body.get("stream") and mode == "ok":
        return web.json_response({"id": "x", "object": "chat.completion", "model": "m",
                                  "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                      "role": "assistant", "content": "hi"}}]})
    if not body.get("stream"):
        data = _huge()
        if mode == "huge":
            return web.Response(body=data, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})  # chunked
        await resp.prepare(request)
        for i in range(0, len(data), 8192):
            await resp.write(data[i:i + 8192])
        await resp.write_eof()
        return resp
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    request.app[MODE]["transport"] = request.transport  # the gateway's connection to it
    if mode == "slow":  # an event every third of the idle limit, for longer than a client waits
        for i in range(300):
            await resp.write(_event(i))
            await asyncio.sleep(IDLE_S / 3)
    if mode == "big":  # large events back to back, then [DONE]
        for _ in range(BIG_EVENTS):
            await resp.write(b"data: " + json.dumps({
                "id": "x", "object": "chat.completion.chunk", "model": "m", "choices": [
                    {"index": 0, "delta": {"content": "y" * BIG}, "finish_reason": None}],
            }).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    if mode == "comments-first":  # OpenRouter while the model works: comments, no event
        for _ in range(10):
            await resp.write(b": OPENROUTER PROCESSING\n\n")
            await asyncio.sleep(IDLE_S / 5)
    if mode.startswith("error-event"):  # vLLM 0.32 on a mid-stream failure: an error event, [DONE]
        error = ENGINE_FAULT if mode == "error-event-500" else ENGINE_ERROR
        await resp.write(_event(0) + _event(1))
        await resp.write(_event(2) + b"data: " + json.dumps(error).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    for i in range(3):
        if mode == "garbage" and i == 1:
            await resp.write(b"data: {not json\n\n")
        if mode == "cut" and i == 2:
            assert request.transport is not None
            request.transport.close()
            return resp
        await resp.write(_event(i))
    if mode == "stall":
        await asyncio.sleep(3600)
    if mode == "keepalive":
        while True:
            await resp.write(b": keep-alive\n\n")
            await asyncio.sleep(IDLE_S / 5)
    if mode == "nodone-after-finish":  # TGI before 2.2: a finish reason, then a clean end
        await resp.write(b"data: " + json.dumps({
            "id": "x", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }).encode() + b"\n\n")
    elif mode != "nodone":
        await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def _messages_event(e: dict[str, Any]) -> bytes:
    return f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode()


async def messages(request: web.Request) -> web.StreamResponse:
    """An Anthropic Messages stream that thinks for three idle limits (thinking events, which
    translate to nothing, every third of one) before its text."""
    await request.json()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(_messages_event({"type": "message_start", "message": {
        "id": "msg_1", "model": "m", "usage": {"input_tokens": 4, "output_tokens": 1}}}))
    await resp.write(_messages_event({"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "thinking", "thinking": ""}}))
    for _ in range(9):
        await asyncio.sleep(IDLE_S / 3)
        await resp.write(_messages_event({"type": "content_block_delta", "index": 0, "delta": {
            "type": "thinking_delta", "thinking": "hmm"}}))
    for e in (
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1,
         "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta",
                                                              "text": "Hi"}},
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
         "usage": {"output_tokens": 5}},
        {"type": "message_stop"},
    ):
        await resp.write(_messages_event(e))
    await resp.write_eof()
    return resp


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[web.Application, int]]:
    app = web.Application()
    app[MODE], app[WAITING] = {"mode": "ok"}, 0.0
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/messages", messages)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield app, port
    finally:
        await runner.cleanup()


async def _gateway(endpoints: list[dict[str, Any]]) -> tuple[Gateway, web.AppRunner, str]:
    port = free_port()
    yaml = to_yaml(pool_fleet(
        gateway={"port": port, "scrape_interval_s": 0.05, "health_interval_s": 0.05,
                 "default_profile": "round-robin", "stream_idle_timeout_s": IDLE_S,
                 "max_upstream_body_bytes": LIMIT},
        substrate={"cost": {"hourly_usd": 3.0}}, endpoints=endpoints, key=KEY,
    ))
    gw = Gateway(parse_config(yaml, "f.yaml"))
    return gw, await serve(gw, "127.0.0.1", port), f"http://127.0.0.1:{port}"


@pytest.fixture
async def gateway(
    upstream: tuple[web.Application, int],
) -> AsyncIterator[tuple[web.Application, Gateway, str]]:
    app, port = upstream
    gw, runner, base = await _gateway([endpoint("up", port)])
    try:
        yield app, gw, base
    finally:
        await runner.cleanup()


async def _post(base: str, stream: bool) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s,
        s.post(f"{base}/v1/chat/completions", json={**CHAT, "stream": stream},
               headers={"Authorization": f"Bearer {KEY}"}) as r,
    ):
        return r.status, dict(r.headers), await r.read()


def _errors(body: bytes) -> list[dict[str, Any]]:
    """The error events of an SSE body."""
    out = []
    for line in body.split(b"\n"):
        if line.startswith(b"data: {"):
            obj = json.loads(line[6:])
            if "error" in obj:
                out.append(obj["error"])
    return out


async def _record(gw: Gateway, decision_id: str) -> dict[str, Any]:
    rec = await gw.ledger.lookup(decision_id)
    assert rec is not None
    return dict(rec["outcome"])


@pytest.mark.parametrize("mode,says", [
    ("nodone", "the stream ended without its closing DONE event (cut short upstream) after 3 "
               "tokens"),
    ("garbage", "sent a stream event that is not JSON: '{not json'"),
    ("stall", f"sent no stream event for {IDLE_S:g} s mid-stream after 3 tokens "
              "(gateway.stream_idle_timeout_s)"),
    ("keepalive", f"sent no stream event for {IDLE_S:g} s mid-stream after 3 tokens "
                  "(gateway.stream_idle_timeout_s)"),
    ("cut", "the connection broke mid-stream after 2 tokens: the engine closed it before the "
            "end of its answer"),
])
async def test_a_broken_stream_is_a_stream_error(
    gateway: tuple[web.Application, Gateway, str], caplog: pytest.LogCaptureFixture,
    mode: str, says: str,
) -> None:
    app, gw, base = gateway
    app[MODE]["mode"] = mode
    caplog.set_level(logging.WARNING, logger="inferplane.core")
    status, headers, body = await _post(base, stream=True)
    assert status == 200  # the head had left: the failure is told in the stream
    errors = _errors(body)
    assert len(errors) == 1, body
    assert errors[0]["message"] == f"upstream 'up': {says}", errors
    assert errors[0]["type"] == "upstream_error"
    # what OpenAI clients see on a cut stream: an error event, no [DONE] line
    assert b"data: [DONE]" not in body.split(b"\n"), body
    assert b"not json" not in body.replace(b"'{not json'", b"")  # the garbage is not relayed
    decision = headers["x-inferplane-decision-id"]
    outcome = await _record(gw, decision)
    assert outcome["status"] == 502 and says in outcome["error"], outcome
    assert gw.metrics.stream_errors.labels("up")._value.get() == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "inferplane.core"]
    assert lines == [f"upstream up failed after its first byte: {says} [decision {decision}]"]


@pytest.mark.parametrize("mode", ["error-event", "error-event-500"])
async def test_an_error_event_then_done_is_a_stream_error(
    gateway: tuple[web.Application, Gateway, str], caplog: pytest.LogCaptureFixture, mode: str,
) -> None:
    """harden26a review S-c: ``data: {"error": ...}`` then ``[DONE]`` (vLLM, SGLang and OpenAI
    on a mid-stream failure) is a stream error, not a success: the tokens before it reach the
    client (one of them in the error's own read), then the gateway's error event (OpenAI shape,
    the engine's message) and ``[DONE]``; the record, the counters and the endpoint's health
    say it failed. The endpoint's health takes a failure for the engine's own fault (a 5xx
    event), not for the request's (vLLM's ``BadRequestError``, ``code: 400``: review27 S2 —
    one tenant's bad requests must not eject an engine)."""
    app, gw, base = gateway
    app[MODE]["mode"] = mode
    caplog.set_level(logging.WARNING, logger="inferplane.core")
    error = ENGINE_FAULT if mode == "error-event-500" else ENGINE_ERROR
    says = f"sent an error event mid-stream after 3 tokens: {error['error']['message']}"
    status, headers, body = await _post(base, stream=True)
    assert status == 200
    assert all(f'"w{i} "'.encode() in body for i in range(3)), body
    errors = _errors(body)
    assert errors == [{"message": f"upstream 'up': {says}", "type": "upstream_error",
                       "param": None, "code": None}], body
    assert body.endswith(b"data: [DONE]\n\n") and body.count(b"data: [DONE]") == 1, body
    assert b"BadRequestError" not in body  # the engine's event is the gateway's
    outcome = await _record(gw, headers["x-inferplane-decision-id"])
    assert outcome["status"] == 502 and outcome["error"] == f"upstream 'up': {says}", outcome
    assert gw.metrics.stream_errors.labels("up")._value.get() == 1
    assert gw.metrics.responses.labels("chat", "502")._value.get() == 1
    assert gw.metrics.responses.labels("chat", "200")._value.get() == 0
    if mode == "error-event-500":
        assert gw.live.live["up"].consecutive_failures == 1  # not a success for its health
    else:
        assert gw.live.live["up"].consecutive_failures == 0  # nor a failure: the request's
    lines = [r.getMessage() for r in caplog.records if r.name == "inferplane.core"]
    assert len(lines) == 1 and says in lines[0], lines


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", ["vllm-400", "openai-400", "azure-400", "openrouter-400"])
async def test_an_engine_refusal_is_relayed_in_the_openai_shape(
    gateway: tuple[web.Application, Gateway, str], mode: str, stream: bool,
) -> None:
    """An engine's 4xx (vLLM's and SGLang's ``type: BadRequestError``, ``code: 400``) reaches
    the client with its status and message in OpenAI's shape (a string ``type`` in OpenAI's
    style, ``code`` a string or null: OpenAI's typed clients read one), with the decision
    headers; an answer already in that shape is relayed byte for byte, and a provider's own
    keys (Azure's ``innererror``, OpenRouter's ``metadata``) are kept (review27 M1)."""
    app, gw, base = gateway
    app[MODE]["mode"] = mode
    status, headers, body = await _post(base, stream=stream)
    assert status == 400, body
    if mode == "openai-400":
        assert body == json.dumps(OPENAI_400, indent=1).encode()
    elif mode == "azure-400":
        azure = json.loads(json.dumps(AZURE_400))
        azure["error"]["type"] = "invalid_request_error"
        assert json.loads(body) == azure, body
    elif mode == "openrouter-400":
        openrouter = json.loads(json.dumps(OPENROUTER_400))
        openrouter["error"].update(type="invalid_request_error", param=None, code=None)
        assert json.loads(body) == openrouter, body
    else:
        assert json.loads(body) == {"error": {
            "message": VLLM_400["error"]["message"], "type": "invalid_request_error",
            "param": "input_tokens", "code": None}}, body
    assert headers["x-inferplane-endpoint"] == "up"
    outcome = await _record(gw, headers["x-inferplane-decision-id"])
    assert outcome["status"] == 400
    assert gw.metrics.responses.labels("chat", "400")._value.get() == 1


def _dechunk(raw: bytes) -> bytes:
    """An HTTP/1.1 chunked body's content."""
    out = []
    while raw:
        size, _, rest = raw.partition(b"\r\n")
        n = int(size.split(b";")[0], 16)
        if n == 0:
            break
        out.append(rest[:n])
        raw = rest[n + 2:]
    return b"".join(out)


def _request_tasks() -> list[asyncio.Task[Any]]:
    """The tasks still running one of the gateway's request handlers (`inferplane.api`): the
    probes', scrapes' and fake upstream's own tasks come and go beside them."""
    out = []
    for task in asyncio.all_tasks():
        coro: Any = task.get_coro()
        while coro is not None:
            frame = getattr(coro, "cr_frame", None)
            if frame is not None and "/inferplane/api/" in frame.f_code.co_filename:
                out.append(task)
                break
            coro = getattr(coro, "cr_await", None)
    return out


def _idle_timers() -> list[asyncio.TimerHandle]:
    """The idle watches' timers still scheduled on the running loop."""
    loop = asyncio.get_running_loop()
    return [h for h in getattr(loop, "_scheduled", [])
            if not h.cancelled() and getattr(h._callback, "__func__", None) is _IdleWatch._check]


async def _settled(gw: Gateway) -> None:
    """Once the request has left the gateway: nothing of it is left running or held (no
    stream, settle or connection in use: the health probes and scrapes share the pool, so it
    is waited for between them; a leaked connection never frees)."""
    assert gw.dispatcher.session is not None
    connector = gw.dispatcher.session.connector
    assert connector is not None
    async with asyncio.timeout(5):
        while (gw.dispatcher.streams or gw.admission._tasks
               or connector._acquired):  # type: ignore[attr-defined]
            await asyncio.sleep(0.005)
    assert not _idle_timers()


@pytest.mark.parametrize("mode", ["stall", "slow"])
async def test_a_client_that_leaves_during_the_idle_watch_is_a_499(
    gateway: tuple[web.Application, Gateway, str], caplog: pytest.LogCaptureFixture, mode: str,
) -> None:
    """harden27 item 5: a client gone mid-stream while the idle watch is armed (the upstream
    silent, or sending slowly): the record says 499 client disconnected, not a stall nor an
    upstream failure; the upstream's connection is closed (the engine aborts the request), not
    pooled; no watch timer, task or connection is left, and nothing fires later."""
    app, gw, base = gateway
    app[MODE]["mode"] = mode
    caplog.set_level(logging.WARNING)
    async with aiohttp.ClientSession() as s:
        r = await s.post(f"{base}/v1/chat/completions", json={**CHAT, "stream": True},
                         headers={"Authorization": f"Bearer {KEY}"})
        decision = r.headers["x-inferplane-decision-id"]
        seen = b""
        while b'"w1 "' not in seen:
            seen += await r.content.readany()
        assert _idle_timers()  # the watch is armed
        r.close()  # the client leaves (its connection closed) before the idle limit
    await _settled(gw)
    outcome = await _record(gw, decision)
    assert outcome["status"] == 499 and outcome["error"] == "client disconnected", outcome
    assert gw.metrics.stream_errors.labels("up")._value.get() == 0
    assert gw.metrics.responses.labels("chat", "499")._value.get() == 1
    upstream = app[MODE]["transport"]  # the stream's connection: closed, never pooled
    assert upstream is None or upstream.is_closing()  # the engine sees the request end
    await asyncio.sleep(3 * IDLE_S)  # past the limit: nothing fires, the gateway logs nothing
    # (the fake upstream's own server logs its failed write: the gateway closed the connection)
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("inferplane")], (
        caplog.text)
    assert not _request_tasks()  # the gateway's handler of it has ended


async def test_a_slow_client_is_not_a_stalled_upstream(
    gateway: tuple[web.Application, Gateway, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """harden27 item 5: a client that stops reading for three idle limits mid-stream, while
    the socket buffers between it and the engine are full: the relay waits on the client, not
    the upstream, and the watch does not count that time (it looks, sees the relay writing and
    looks again later); the whole answer arrives and the record says 200."""
    app, gw, base = gateway
    app[MODE]["mode"] = "big"
    deferred = 0
    check = _IdleWatch._check

    def counting(self: _IdleWatch) -> None:
        nonlocal deferred
        deferred += not self.reading
        check(self)

    monkeypatch.setattr(_IdleWatch, "_check", counting)
    port = int(base.rsplit(":", 1)[1])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    body = json.dumps({**CHAT, "stream": True}).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                 b"Content-Type: application/json\r\nConnection: close\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    decision = next(line.split(b": ", 1)[1].decode() for line in head.split(b"\r\n")
                    if line.lower().startswith(b"x-inferplane-decision-id"))
    got = await reader.read(4096)
    await asyncio.sleep(3 * IDLE_S)  # the client stops reading
    got += await reader.read()  # then reads the rest, to the end of the body
    writer.close()
    got = _dechunk(got)
    assert deferred >= 1  # the watch found the relay writing to the client, and waited
    assert got.count(b'"content": "' + b"y" * 16) == BIG_EVENTS, len(got)
    assert b"upstream_error" not in got and b"data: [DONE]" in got
    await _settled(gw)
    outcome = await _record(gw, decision)
    assert outcome["status"] == 200 and outcome["error"] is None, outcome
    assert gw.metrics.stream_errors.labels("up")._value.get() == 0


async def test_a_whole_stream_is_still_a_success(
    gateway: tuple[web.Application, Gateway, str], caplog: pytest.LogCaptureFixture,
) -> None:
    _, gw, base = gateway
    caplog.set_level(logging.WARNING)
    status, headers, body = await _post(base, stream=True)
    assert status == 200 and not _errors(body) and body.endswith(b"data: [DONE]\n\n"), body
    assert (await _record(gw, headers["x-inferplane-decision-id"]))["status"] == 200
    assert not caplog.records


@pytest.mark.parametrize("mode", ["comments-first", "nodone-after-finish"])
async def test_a_complete_stream_is_a_success(
    gateway: tuple[web.Application, Gateway, str], caplog: pytest.LogCaptureFixture, mode: str,
) -> None:
    """review26 S-b: comments before the first event (OpenRouter's) do not start the idle
    clock; S-a: a clean end after a finish reason without [DONE] (TGI before 2.2) is complete,
    the gateway sends the [DONE], and says so once per endpoint."""
    app, gw, base = gateway
    app[MODE]["mode"] = mode
    caplog.set_level(logging.INFO)
    for _ in range(2):
        status, headers, body = await _post(base, stream=True)
        assert status == 200 and not _errors(body), body
        assert body.endswith(b"data: [DONE]\n\n"), body
        assert (await _record(gw, headers["x-inferplane-decision-id"]))["status"] == 200
    assert gw.metrics.stream_errors.labels("up")._value.get() == 0
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if mode == "nodone-after-finish":
        assert len(lines) == 1 and "ends its streams without data: [DONE]" in lines[0], lines
    else:
        assert not lines, lines


async def test_a_thinking_messages_stream_is_not_cut_as_idle(
    upstream: tuple[web.Application, int],
) -> None:
    """review26 M-b: a Messages stream's thinking events translate to nothing, yet they are
    the upstream's events: the idle watch hears them, and the stream is a success."""
    _, port = upstream
    gw, runner, base = await _gateway([endpoint("claude", url=f"http://127.0.0.1:{port}/v1",
                                                dialect="anthropic",
                                                health_check="passive")])
    try:
        status, headers, body = await _post(base, stream=True)
        assert status == 200 and not _errors(body), body
        assert b'"Hi"' in body and body.endswith(b"data: [DONE]\n\n"), body
        assert (await _record(gw, headers["x-inferplane-decision-id"]))["status"] == 200
        assert gw.metrics.stream_errors.labels("claude")._value.get() == 0
    finally:
        await runner.cleanup()


async def test_a_stall_in_a_task_already_being_cancelled_is_still_a_stall() -> None:
    """review26 S-f: the watch takes back only its own cancellation, counted against the
    task's cancellations pending when it was made (as asyncio.timeout does)."""
    task = asyncio.current_task()
    assert task is not None
    task.cancel()  # a cancellation that was caught and not taken back
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(0)
    assert task.cancelling() == 1
    watch = _IdleWatch(IDLE_S)
    watch.heard()
    watch.reading = True
    watch.since -= 2 * IDLE_S  # silent for longer than the limit
    watch._check()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(0)
    assert watch.stalled()
    watch.close()
    assert task.uncancel() == 0


@pytest.mark.parametrize("mode", ["huge", "chunked"])
async def test_a_non_streamed_answer_over_the_limit_is_a_502_naming_it(
    gateway: tuple[web.Application, Gateway, str], mode: str,
) -> None:
    app, _, base = gateway
    app[MODE]["mode"] = mode
    status, _, body = await _post(base, stream=False)
    assert status == 502, body
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    size = f"more than {LIMIT}" if mode == "chunked" else str(len(_huge()))
    assert err["message"] == (f"upstream 'up': answered with a body of {size} bytes, over the "
                              f"limit of {LIMIT} bytes (gateway.max_upstream_body_bytes)"), err


async def test_a_dead_engine_is_logged_once_with_its_reason(
    upstream: tuple[web.Application, int], caplog: pytest.LogCaptureFixture,
) -> None:
    """An endpoint on a closed port: its failed attempt is a WARNING naming it, the reason and
    the decision id (and the request is served elsewhere); its health probe's failure is one
    line however many probes fail."""
    _, port = upstream
    dead = free_port()
    caplog.set_level(logging.WARNING)
    _, runner, base = await _gateway([
        endpoint("dead", dead, health_check="passive"), endpoint("probed", free_port()),
        endpoint("up", port),
    ])
    try:
        for _ in range(4):  # round robin: "dead" is tried, fails, the request goes to "up"
            status, headers, _ = await _post(base, stream=False)
            assert status == 200 and headers["x-inferplane-endpoint"] == "up"
        await asyncio.sleep(0.3)  # several probe rounds of "probed"
    finally:
        await runner.cleanup()
    lines = [r.getMessage() for r in caplog.records]
    attempts = [m for m in lines if m.startswith("upstream dead failed before its first byte")]
    assert len(attempts) == 1, lines
    assert "(connect): cannot connect (" in attempts[0], attempts
    assert "[decision " in attempts[0] and ", attempt 1]" in attempts[0]
    probes = [m for m in lines if m.startswith("health probe of probed failed")]
    assert probes == [probes[0]] and "cannot connect" in probes[0], lines


def test_the_stream_check_reads_every_event_however_it_is_cut() -> None:
    """`OpenAIEvents` (made cheaper in harden27) keeps its checks: events split across reads,
    CRLF lines, ``data:`` without a space, comments and event names, ``[DONE]``, a finish
    reason, an error event after tokens in the same read (where its line begins), and a
    ``data:`` line that is not JSON."""
    stream = (b": keep-alive\r\n\r\n" + _event(0) + b"event: x\ndata:" + _event(1)[5:]
              + b'data: {"choices":[{"index":0,"finish_reason":"length"}]}\r\n\r\n'
              + b"data:[DONE]\r\n\r\n")
    for cut in range(1, len(stream)):  # every way of reading it in two
        events = OpenAIEvents()
        assert events.feed(stream[:cut]) is None and events.feed(stream[cut:]) is None
        assert events.finished and events.done and events.close() is None
    events = OpenAIEvents()
    assert events.feed(_event(0)) is None and not events.finished
    assert events.close() == "the stream ended without its closing DONE event (cut short upstream)"
    error = b'data: {"error": {"message": "boom", "code": 500}}\n\n'
    for head in (b"", _event(1)[:9]):  # the error's line whole in the read, or an event before
        # it begun in the read before
        events = OpenAIEvents()
        assert events.feed(head) is None
        rest = _event(1)[len(head):] if head else b""
        assert events.feed(rest + _event(2) + error + b"data: [DONE]\n\n") == "boom"
        assert events.error == {"message": "boom", "code": 500}
        assert events.error_at == len(rest) + len(_event(2))
    events = OpenAIEvents()
    assert events.feed(b'data: {"error": "text"}\n\n') == "text"
    assert events.feed(b"data: {not json\n\n") == (
        "sent a stream event that is not JSON: '{not json'")
    for empty in (b"null", b"false", b'""', b"{}"):  # not an error event (review27 N8)
        assert OpenAIEvents().feed(b'data: {"error": ' + empty + b', "choices": []}\n\n') is None
    # review27 S6: where the error's line begins, exactly, even with the same bytes in a comment
    # before it (a comment is not parsed); and 0 when the error's own line began before the read
    events = OpenAIEvents()
    line = error.rstrip(b"\n")
    head = b'data: {"choices":[]}\n\n: ' + line + b"\n\n" + _event(3)
    assert events.feed(head + error) == "boom" and events.error_at == len(head)
    events = OpenAIEvents()
    assert events.feed(_event(4) + error[:10]) is None
    assert events.feed(error[10:] + b"data: [DONE]\n\n") == "boom" and events.error_at == 0


def test_the_log_limiter_lets_one_line_per_key_per_interval() -> None:
    class Clock:
        t = 0.0

        def __call__(self) -> float:
            return self.t

    clock = Clock()
    seen: list[str] = []

    class Log(logging.Logger):
        def warning(self, msg: object, *args: Any, **kw: Any) -> None:  # type: ignore[override]
            seen.append(str(msg) % args)

    limiter = LogLimiter(Log("t"), 30.0, clock)
    assert limiter.warn("a", "a failed %d", 1)
    assert not limiter.warn("a", "a failed %d", 2)
    assert limiter.warn("b", "b failed %d", 1)  # per key
    clock.t = 29.0
    assert not limiter.warn("a", "a failed %d", 3)
    clock.t = 31.0
    assert limiter.warn("a", "a failed %d", 4)
    assert seen == ["a failed 1", "b failed 1",
                    "a failed 4 (2 more like it on a in the last 31 s not logged)"]
