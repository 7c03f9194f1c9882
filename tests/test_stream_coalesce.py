"""`gateway.stream_coalesce_ms`: a stream's chunks after the first are relayed in groups, through
the real gateway over loopback, with nothing lost, the first chunk alone and the request
accounted as without it; only while `gateway.stream_coalesce_min_streams` streams are relayed by
that gateway (its dispatcher's count, back to 0 however a stream ends)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway, hash_key
from inferplane.config.loader import parse_config
from inferplane.config.schema import GatewaySpec
from inferplane.dispatch import upstream
from inferplane.dispatch.answer import StreamStats
from tests.support.procs import free_port

KEY = "sk-coalesce"
TOKENS = 12
CUT = "cut"  # a completion prompt the engine answers with 3 tokens, then a dropped connection
BARRIER: web.AppKey[asyncio.Barrier] = web.AppKey("barrier", asyncio.Barrier)


async def _engine(request: web.Request) -> web.StreamResponse:
    """Streams TOKENS text events, 10 ms apart after a 50 ms pause behind the first (a chat
    stream opens with a role-only chunk 1 ms before it), the last with a finish reason, then
    the usage chunk and [DONE] 20 ms later; each event as its own write. With a barrier in the
    app, each answer starts once that many requests have arrived (at any of the engines that
    share it); the prompt CUT is answered with 3 tokens and then the connection is dropped."""
    body = orjson.loads(await request.read())
    chat = request.path.endswith("/chat/completions")
    barrier = request.app.get(BARRIER)
    if barrier is not None:
        await asyncio.wait_for(barrier.wait(), 10)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    if body.get("prompt") == CUT:
        for i in range(3):
            event = {"choices": [{"index": 0, "text": f"t{i} ", "finish_reason": None}]}
            await resp.write(b"data: " + orjson.dumps(event) + b"\n\n")
            await asyncio.sleep(0.02)
        assert request.transport is not None
        request.transport.abort()  # mid-stream: no more events, no [DONE], no chunked end
        return resp
    if chat:
        role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                             "finish_reason": None}]}
        await resp.write(b"data: " + orjson.dumps(role) + b"\n\n")
        await asyncio.sleep(0.001)
    for i in range(TOKENS):
        text = f"t{i} "
        choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
        event = {"choices": [{**choice, "finish_reason": "length" if i == TOKENS - 1 else None}]}
        await resp.write(b"data: " + orjson.dumps(event) + b"\n\n")
        await asyncio.sleep(0.05 if i == 0 else 0.01)
    await asyncio.sleep(0.01)
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": 3, "completion_tokens": TOKENS, "total_tokens": 3 + TOKENS}
        await resp.write(b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="")


async def _stack(
    coalesce_ms: float, min_streams: int = 1, barrier: asyncio.Barrier | None = None
) -> tuple[Gateway, web.AppRunner, web.AppRunner, str]:
    up_port, gw_port = free_port(), free_port()
    app = web.Application()
    if barrier is not None:
        app[BARRIER] = barrier
    app.router.add_post("/v1/completions", _engine)
    app.router.add_post("/v1/chat/completions", _engine)
    app.router.add_get("/health", _health)
    up = web.AppRunner(app)
    await up.setup()
    await web.TCPSite(up, "127.0.0.1", up_port).start()
    config = parse_config(f"""
gateway: {{port: {gw_port}, stream_coalesce_ms: {coalesce_ms},
           stream_coalesce_min_streams: {min_streams}, scrape_interval_s: 60,
           health_interval_s: 60, metrics: {{public: true}}}}
substrates:
  - name: pool
    kind: gpu
    hardware: h100
    region: r1
    jurisdiction: eu
    cost: {{input_per_mtok: 1.0, output_per_mtok: 2.0}}
    endpoints:
      - {{name: e, url: "http://127.0.0.1:{up_port}", scrape_metrics: false,
          models: [{{name: m, profile: llama-3.1-8b, max_context: 8192}}]}}
tenants:
  - {{name: t, api_keys: ["{hash_key(KEY)}"]}}
""")
    gw = Gateway(config)
    runner = await serve(gw, "127.0.0.1", gw_port)
    return gw, runner, up, f"http://127.0.0.1:{gw_port}"


CHAT = {"model": "m", "messages": [{"role": "user", "content": "a b c"}], "max_tokens": TOKENS,
        "stream": True}
COMPLETION = {"model": "m", "prompt": "a b c", "max_tokens": TOKENS, "stream": True}


@contextlib.asynccontextmanager
async def _gateway(
    coalesce_ms: float, min_streams: int = 1, barrier: asyncio.Barrier | None = None
) -> AsyncIterator[tuple[Gateway, str]]:
    """A gateway (and its engine) serving at the URL it yields, stopped after."""
    gw, runner, up, base = await _stack(coalesce_ms, min_streams, barrier)
    try:
        yield gw, base
    finally:
        await runner.cleanup()
        await up.cleanup()


async def _read(base: str, chat: bool = False) -> tuple[list[bytes], str]:
    """One streamed request: the chunks the client read, and its decision id."""
    path, body = ("/v1/chat/completions", CHAT) if chat else ("/v1/completions", COMPLETION)
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s,
        s.post(base + path, json=body) as r,
    ):
        assert r.status == 200, await r.text()
        chunks = [c async for c in r.content.iter_any()]
        return chunks, r.headers["x-inferplane-decision-id"]


async def _stream(coalesce_ms: float, chat: bool = False
                  ) -> tuple[list[bytes], dict[str, object]]:
    """The chunks the client read, and the request's ledger outcome."""
    async with _gateway(coalesce_ms) as (gw, base):
        chunks, did = await _read(base, chat)
        outcome = gw.ledger.get(did)["outcome"]  # type: ignore[index]
        assert gw.dispatcher.streams == 0
        return chunks, outcome


def _text(event: bytes) -> str:
    choice = orjson.loads(event[6:])["choices"][0]
    return str(choice["delta"].get("content", "") if "delta" in choice else choice["text"])


def _events(chunks: list[bytes]) -> list[bytes]:
    return [e for e in b"".join(chunks).split(b"\n\n") if e.startswith(b"data:")]


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("coalesce_ms", [0.0, 60.0])
async def test_every_event_arrives_and_the_request_is_accounted(
    coalesce_ms: float, chat: bool
) -> None:
    chunks, outcome = await _stream(coalesce_ms, chat)
    events = _events(chunks)
    texts = [t for e in events if e != b"data: [DONE]" and (t := _text(e))]
    assert texts == [f"t{i} " for i in range(TOKENS)]  # in order, none lost, no usage chunk
    assert events[-1] == b"data: [DONE]"
    assert outcome["completion_tokens"] == TOKENS and outcome["prompt_tokens"] == 3


async def test_tokens_after_the_first_are_relayed_in_groups() -> None:
    chunks, _ = await _stream(500.0)
    first = _events(chunks[:1])
    assert len(first) == 1 and b"t0 " in first[0]  # the first token is never held back
    # the engine writes the 11 other events within ~110 ms of the first, each on its own; the
    # gateway holds the connection's bytes 500 ms after handing on the first: they come as one
    # group (two if this host stalled the engine past the hold), not one chunk per event
    # (the receipt comment, [DONE] and the end of the stream follow the last group)
    data_chunks = [c for c in chunks[1:] if b"data: {" in c]
    assert 1 <= len(data_chunks) <= 2, [len(_events([c])) for c in chunks]


@pytest.mark.parametrize("chat", [False, True])
async def test_holds_start_at_the_first_text_and_end_at_the_finish(
    chat: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which chunks a hold follows (`upstream._hold` recorded instead of waiting): never the
    role-only opening of a chat stream (the first token would wait behind it), never the chunk
    with the finish reason or what follows it (the usage chunk and [DONE] would wait)."""
    seen: list[bytes] = []  # what the relay had read when it asked for each hold
    real_hold = upstream._hold

    async def recorded(resp: aiohttp.ClientResponse, until: float) -> bool:
        seen.append(b"".join(bytes(c) for c in read))
        return await real_hold(resp, until)

    read: list[bytes] = []
    real_observe = StreamStats.observe

    def observe(self: StreamStats, chunk: bytes, now: float) -> None:
        read.append(chunk)
        real_observe(self, chunk, now)

    monkeypatch.setattr(upstream, "_hold", recorded)
    monkeypatch.setattr(StreamStats, "observe", observe)
    await _stream(5.0, chat)
    assert seen, "no hold at all"
    for before in seen:
        events = _events([before])
        assert any(_text(e) for e in events), "held before the first text"
        assert b'"finish_reason":"length"' not in before, "held after the finish reason"


def _data_chunks(chunks: list[bytes]) -> list[bytes]:
    """The chunks after the first that carry token events (each read of the client)."""
    return [c for c in chunks[1:] if b"data: {" in c]


def _count_holds(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every call of `upstream._hold` from now on (its ``until``), recorded before it runs."""
    calls: list[float] = []
    real_hold = upstream._hold

    async def counted(resp: aiohttp.ClientResponse, until: float) -> bool:
        calls.append(until)
        return await real_hold(resp, until)

    monkeypatch.setattr(upstream, "_hold", counted)
    return calls


async def _until_no_stream(gw: Gateway, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while gw.dispatcher.streams and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert gw.dispatcher.streams == 0, "a relay ended without its stream uncounted"


def test_min_streams_defaults_to_4_and_is_at_least_1() -> None:
    assert GatewaySpec().stream_coalesce_min_streams == 4
    assert GatewaySpec().stream_coalesce_ms == 0
    with pytest.raises(ValueError, match="stream_coalesce_min_streams"):
        GatewaySpec(stream_coalesce_min_streams=0)


async def test_a_lone_stream_is_not_held_below_min_streams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """min_streams 2: one stream at a time is relayed chunk by chunk, as with coalescing off,
    however long the hold would be."""
    calls = _count_holds(monkeypatch)
    async with _gateway(500.0, min_streams=2) as (gw, base):
        for chat in (False, True):
            chunks, _ = await _read(base, chat)
            texts = [t for e in _events(chunks) if e != b"data: [DONE]" and (t := _text(e))]
            assert texts == [f"t{i} " for i in range(TOKENS)]
            # 11 events written 10 ms apart, each its own read (a 500 ms hold would give 1-2)
            assert len(_data_chunks(chunks)) > 4, [len(_events([c])) for c in chunks]
        assert calls == [] and gw.dispatcher.holds == 0
        assert gw.dispatcher.streams == 0


async def test_concurrent_streams_at_min_streams_are_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """min_streams 3 and three streams at once (the engine answers once all three asked): each
    stream's tokens come in groups, the holds are counted and exported on /metrics, and the
    count of streams is back to 0 once they ended."""
    calls = _count_holds(monkeypatch)
    async with _gateway(60.0, min_streams=3, barrier=asyncio.Barrier(3)) as (gw, base):
        results = await asyncio.gather(*(_read(base) for _ in range(3)))
        for chunks, _ in results:
            texts = [t for e in _events(chunks) if e != b"data: [DONE]" and (t := _text(e))]
            assert texts == [f"t{i} " for i in range(TOKENS)]
            # 60 ms holds over 10 ms apart events: 2-4 groups (not 11 reads)
            assert len(_data_chunks(chunks)) <= 7, [len(_events([c])) for c in chunks]
        assert gw.dispatcher.holds >= 3 and len(calls) >= gw.dispatcher.holds
        assert gw.dispatcher.streams == 0
        async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as r:
            page = await r.text()
        assert re.search(rf"^inferplane_stream_coalesce_holds_total {gw.dispatcher.holds}\.0$",
                         page, re.M), page
        assert re.search(r"^inferplane_streams_relayed 0\.0$", page, re.M)


async def test_streams_are_counted_per_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two gateways in one process, min_streams 2, one stream through each at the same time
    (their engines answer once both asked): neither gateway relays two streams, none is held."""
    calls = _count_holds(monkeypatch)
    barrier = asyncio.Barrier(2)
    async with (
        _gateway(500.0, min_streams=2, barrier=barrier) as (gw1, base1),
        _gateway(500.0, min_streams=2, barrier=barrier) as (gw2, base2),
    ):
        seen: list[int] = []
        real_observe = StreamStats.observe

        def observe(self: StreamStats, chunk: bytes, now: float) -> None:
            seen.append(gw1.dispatcher.streams + 10 * gw2.dispatcher.streams)
            real_observe(self, chunk, now)

        monkeypatch.setattr(StreamStats, "observe", observe)
        (chunks1, _), (chunks2, _) = await asyncio.gather(_read(base1), _read(base2))
        assert 11 in seen  # both streams relayed at once, one by each gateway
        assert calls == [] and gw1.dispatcher.holds == gw2.dispatcher.holds == 0
        assert len(_data_chunks(chunks1)) > 4 and len(_data_chunks(chunks2)) > 4
        assert gw1.dispatcher.streams == gw2.dispatcher.streams == 0


@pytest.mark.parametrize("coalesce_ms", [0.0, 30.0])
async def test_the_count_is_back_to_0_after_an_upstream_error_mid_stream(
    coalesce_ms: float,
) -> None:
    async with _gateway(coalesce_ms, min_streams=1) as (gw, base):
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s,
            s.post(base + "/v1/completions", json={**COMPLETION, "prompt": CUT}) as r,
        ):
            assert r.status == 200
            first = await r.content.readany()
            assert b"t0 " in first
            assert gw.dispatcher.streams == 1
            rest = b"".join([c async for c in r.content.iter_any()])
        assert b'"error"' in rest  # the gateway ended the stream with an error event
        assert gw.metrics.registry.get_sample_value(
            "inferplane_stream_errors_total", {"endpoint": "e"}) == 1
        await _until_no_stream(gw)


@pytest.mark.parametrize("coalesce_ms", [0.0, 30.0])
async def test_the_count_is_back_to_0_after_the_client_goes(coalesce_ms: float) -> None:
    async with _gateway(coalesce_ms, min_streams=1) as (gw, base):
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s,
            s.post(base + "/v1/completions", json=COMPLETION) as r,
        ):
            assert r.status == 200
            assert b"t0 " in await r.content.readany()
            assert gw.dispatcher.streams == 1
            r.close()  # the client drops the connection mid-stream
        await _until_no_stream(gw)
