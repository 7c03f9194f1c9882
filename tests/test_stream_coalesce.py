"""`gateway.stream_coalesce_ms`: a stream's chunks after the first are relayed in groups, through
the real gateway over loopback, with nothing lost, the first chunk alone and the request
accounted as without it; only while `gateway.stream_coalesce_min_streams` streams are relayed by
that gateway (its dispatcher's count, back to 0 however a stream ends)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable

import aiohttp
import orjson
import pytest
from aiohttp import web

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from inferplane.config.schema import GatewaySpec
from inferplane.dispatch import upstream
from inferplane.dispatch.answer import StreamStats
from tests.builders import pool_fleet, tenant, to_yaml
from tests.support.procs import free_port

KEY = "sk-coalesce"
TOKENS = 12
CUT = "cut"  # a completion prompt the engine answers with 3 tokens, then a dropped connection
PROMPT = "a b c"
Gates = dict[str, list[asyncio.Event]]
GATES: web.AppKey[Gates] = web.AppKey("gates", dict)


async def _engine(request: web.Request) -> web.StreamResponse:
    """Streams TOKENS text events, 10 ms apart after a 50 ms pause behind the first (a chat
    stream opens with a role-only chunk 1 ms before it), the last with a finish reason, then
    the usage chunk and [DONE] 20 ms later; each event as its own write. With gates in the app
    for the request's prompt (a completion's prompt, PROMPT for a chat), the engine waits after
    its i-th token until the test sets the i-th gate (at most 10 s: a test that never sets it
    fails instead of hanging), so the test decides what has been sent when; each answer names
    its prompt in ``x-prompt``. The prompt CUT is answered with 3 tokens and then the
    connection is dropped."""
    body = orjson.loads(await request.read())
    chat = request.path.endswith("/chat/completions")
    prompt = PROMPT if chat else str(body.get("prompt"))
    gates = request.app.get(GATES, {}).get(prompt, [])

    async def gate(i: int) -> None:
        if i < len(gates):
            await asyncio.wait_for(gates[i].wait(), 10)

    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-prompt": prompt})
    await resp.prepare(request)
    if prompt == CUT:
        for i in range(3):
            event = {"choices": [{"index": 0, "text": f"t{i} ", "finish_reason": None}]}
            await resp.write(b"data: " + orjson.dumps(event) + b"\n\n")
            await gate(i)
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
        await gate(i)
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
    coalesce_ms: float, min_streams: int = 1, gates: Gates | None = None
) -> tuple[Gateway, web.AppRunner, web.AppRunner, str]:
    up_port, gw_port = free_port(), free_port()
    app = web.Application()
    if gates is not None:
        app[GATES] = gates
    app.router.add_post("/v1/completions", _engine)
    app.router.add_post("/v1/chat/completions", _engine)
    app.router.add_get("/health", _health)
    up = web.AppRunner(app)
    await up.setup()
    await web.TCPSite(up, "127.0.0.1", up_port).start()
    config = parse_config(to_yaml(pool_fleet(
        up_port, tenants=[tenant("t", KEY)],
        endpoint_fields={"name": "e", "scrape_metrics": False},
        gateway={"port": gw_port, "stream_coalesce_ms": coalesce_ms,
                 "stream_coalesce_min_streams": min_streams, "scrape_interval_s": 60,
                 "health_interval_s": 60, "metrics": {"public": True}})))
    gw = Gateway(config)
    runner = await serve(gw, "127.0.0.1", gw_port)
    return gw, runner, up, f"http://127.0.0.1:{gw_port}"


CHAT = {"model": "m", "messages": [{"role": "user", "content": "a b c"}], "max_tokens": TOKENS,
        "stream": True}
COMPLETION = {"model": "m", "prompt": PROMPT, "max_tokens": TOKENS, "stream": True}


@contextlib.asynccontextmanager
async def _gateway(
    coalesce_ms: float, min_streams: int = 1, gates: Gates | None = None
) -> AsyncIterator[tuple[Gateway, str]]:
    """A gateway (and its engine) serving at the URL it yields, stopped after."""
    gw, runner, up, base = await _stack(coalesce_ms, min_streams, gates)
    try:
        yield gw, base
    finally:
        await runner.cleanup()
        await up.cleanup()


async def _read(base: str, chat: bool = False, prompt: str = PROMPT
                ) -> tuple[list[bytes], str]:
    """One streamed request: the chunks the client read, and its decision id."""
    path, body = (
        ("/v1/chat/completions", CHAT) if chat
        else ("/v1/completions", {**COMPLETION, "prompt": prompt})
    )
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s,
        s.post(base + path, json=body) as r,
    ):
        assert r.status == 200, await r.text()
        chunks = [c async for c in r.content.iter_any()]
        return chunks, r.headers["x-inferplane-decision-id"]


async def _stream(coalesce_ms: float, chat: bool = False, gates: Gates | None = None
                  ) -> tuple[list[bytes], dict[str, object]]:
    """The chunks the client read, and the request's ledger outcome."""
    async with _gateway(coalesce_ms, gates=gates) as (gw, base):
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


async def test_tokens_after_the_first_are_relayed_in_groups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the engine sends while the relay holds goes out as one write. Deterministic: the
    engine waits after its first token until the client has read it, and the hold (the real
    `upstream._hold`, run once the engine's whole answer is in the gateway's reader; it then
    returns at once) does not end before all of it arrived."""
    go = asyncio.Event()
    real_hold = upstream._hold

    async def hold(resp: aiohttp.ClientResponse, until: float) -> bool:
        await asyncio.wait_for(resp.content.wait_eof(), 10)
        return await real_hold(resp, until)

    monkeypatch.setattr(upstream, "_hold", hold)
    async with _gateway(500.0, gates={PROMPT: [go]}) as (gw, base):
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s,
            s.post(base + "/v1/completions", json=COMPLETION) as r,
        ):
            assert r.status == 200
            first = _events([await r.content.readany()])
            assert len(first) == 1 and b"t0 " in first[0]  # the first token is never held back
            go.set()  # the engine writes the 11 other events, each on its own
            chunks = [c async for c in r.content.iter_any()]
        texts = [t for e in _events(chunks) if e != b"data: [DONE]" and (t := _text(e))]
        assert texts == [f"t{i} " for i in range(1, TOKENS)]
        # one group, not one chunk per event (the receipt comment and [DONE] follow it)
        assert len([c for c in chunks if b"data: {" in c]) == 1, [
            len(_events([c])) for c in chunks]
        assert gw.dispatcher.streams == 0


@pytest.mark.parametrize("chat", [False, True])
async def test_holds_start_at_the_first_text_and_end_at_the_finish(
    chat: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which chunks a hold follows (`upstream._hold` recorded before it runs): never the
    role-only opening of a chat stream (the first token would wait behind it), never the chunk
    with the finish reason or what follows it (the usage chunk and [DONE] would wait). The
    engine sends what follows its first token only once the relay asked for a hold, so there
    is at least one, however slow this host."""
    seen: list[bytes] = []  # what the relay had read when it asked for each hold
    real_hold = upstream._hold
    go = asyncio.Event()

    async def recorded(resp: aiohttp.ClientResponse, until: float) -> bool:
        seen.append(b"".join(bytes(c) for c in read))
        go.set()
        return await real_hold(resp, until)

    read: list[bytes] = []
    real_observe = StreamStats.observe

    def observe(self: StreamStats, chunk: bytes, now: float) -> None:
        read.append(chunk)
        real_observe(self, chunk, now)

    monkeypatch.setattr(upstream, "_hold", recorded)
    monkeypatch.setattr(StreamStats, "observe", observe)
    chunks, _ = await _stream(5.0, chat, gates={PROMPT: [go]})
    assert [t for e in _events(chunks) if e != b"data: [DONE]" and (t := _text(e))] == [
        f"t{i} " for i in range(TOKENS)]
    assert seen, "no hold at all"
    for before in seen:
        events = _events([before])
        assert any(_text(e) for e in events), "held before the first text"
        assert b'"finish_reason":"length"' not in before, "held after the finish reason"


def _data_chunks(chunks: list[bytes]) -> list[bytes]:
    """The chunks after the first that carry token events (each read of the client)."""
    return [c for c in chunks[1:] if b"data: {" in c]


def _count_holds(monkeypatch: pytest.MonkeyPatch) -> tuple[list[float], list[bool]]:
    """Every call of `upstream._hold` from now on: its ``until``, recorded before it runs, and
    what it returned (True: it paused the connection), recorded after."""
    calls: list[float] = []
    results: list[bool] = []
    real_hold = upstream._hold

    async def counted(resp: aiohttp.ClientResponse, until: float) -> bool:
        calls.append(until)
        held = await real_hold(resp, until)
        results.append(held)
        return held

    monkeypatch.setattr(upstream, "_hold", counted)
    return calls, results


async def _until(cond: Callable[[], bool], what: str) -> None:
    """Yield to the event loop until ``cond()`` holds. The 10 s limit only turns a hang into a
    failure; no result depends on how long it takes."""
    try:
        async with asyncio.timeout(10):
            while not cond():
                await asyncio.sleep(0.001)
    except TimeoutError:
        raise AssertionError(f"never: {what}") from None


async def _until_no_stream(gw: Gateway) -> None:
    await _until(lambda: gw.dispatcher.streams == 0, "a relay ended with its stream uncounted")


async def _scrape(base: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as r:
        assert r.status == 200
        return await r.text()


def test_min_streams_defaults_to_4_and_is_at_least_1() -> None:
    assert GatewaySpec().stream_coalesce_min_streams == 4
    assert GatewaySpec().stream_coalesce_ms == 0
    with pytest.raises(ValueError, match="stream_coalesce_min_streams"):
        GatewaySpec(stream_coalesce_min_streams=0)


async def test_a_lone_stream_is_not_held_below_min_streams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """min_streams 2: one stream at a time is relayed as it arrives, as with coalescing off,
    however long the hold would be: the relay never even asks for a hold (which chunks the
    client reads together depends on this host's timing, so it is not asserted)."""
    calls, _ = _count_holds(monkeypatch)
    async with _gateway(500.0, min_streams=2) as (gw, base):
        for chat in (False, True):
            chunks, _ = await _read(base, chat)
            texts = [t for e in _events(chunks) if e != b"data: [DONE]" and (t := _text(e))]
            assert texts == [f"t{i} " for i in range(TOKENS)]
        assert calls == [] and gw.dispatcher.holds == 0
        assert gw.dispatcher.streams == 0


async def test_concurrent_streams_at_min_streams_are_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """min_streams 3 and three streams at once: each engine answer waits after its first token
    until all three are relayed, and after its second until the relays asked for three holds
    (none can end meanwhile, so all three are counted then); ``holds`` counts exactly the holds
    that paused a connection, /metrics exports it, and the count is back to 0 after."""
    calls, results = _count_holds(monkeypatch)
    g0, g1 = asyncio.Event(), asyncio.Event()
    async with _gateway(60.0, min_streams=3, gates={PROMPT: [g0, g1]}) as (gw, base):

        async def control() -> None:
            await _until(lambda: gw.dispatcher.streams == 3, "three streams relayed at once")
            g0.set()  # each engine sends its second token and waits
            await _until(lambda: len(calls) >= 3, "a hold asked for each stream")
            assert gw.dispatcher.streams == 3
            g1.set()

        ctl = asyncio.create_task(control())
        answers = await asyncio.gather(*(_read(base) for _ in range(3)))
        await ctl
        for chunks, _ in answers:
            texts = [t for e in _events(chunks) if e != b"data: [DONE]" and (t := _text(e))]
            assert texts == [f"t{i} " for i in range(TOKENS)]
        assert len(results) == len(calls) >= 3
        assert gw.dispatcher.holds == sum(results)  # the holds that paused, no others
        assert gw.dispatcher.streams == 0
        page = await _scrape(base)
        assert re.search(rf"^inferplane_stream_coalesce_holds_total {gw.dispatcher.holds}\.0$",
                         page, re.M), page
        assert re.search(r"^inferplane_streams_relayed 0\.0$", page, re.M)


async def test_a_stream_is_held_once_others_join(monkeypatch: pytest.MonkeyPatch) -> None:
    """min_streams 2: stream A starts alone and is relayed without a hold; once B is relayed
    too, A is held, but still never before its first text nor after its finish reason. The
    engine answers step by step, each step let go by the test (no timing)."""
    a0, a1, a2, b0 = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()
    gates = {"A": [a0, a1, a2], "B": [b0]}
    async with _gateway(5.0, min_streams=2, gates=gates) as (gw, base):
        reads: dict[int, list[bytes]] = {}  # each relay's reads, by its StreamStats
        real_observe = StreamStats.observe

        def observe(self: StreamStats, chunk: bytes, now: float) -> None:
            reads.setdefault(id(self), []).append(chunk)
            real_observe(self, chunk, now)

        calls: list[tuple[str, int, bytes]] = []  # (prompt, streams, what A had read)
        real_hold = upstream._hold

        async def recorded(resp: aiohttp.ClientResponse, until: float) -> bool:
            a_read = b"".join(next(iter(reads.values())))  # A's relay read first
            calls.append((resp.headers["x-prompt"], gw.dispatcher.streams, a_read))
            return await real_hold(resp, until)

        monkeypatch.setattr(StreamStats, "observe", observe)
        monkeypatch.setattr(upstream, "_hold", recorded)
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s,
            s.post(base + "/v1/completions", json={**COMPLETION, "prompt": "A"}) as r,
        ):
            assert r.status == 200
            got = await r.content.readany()
            assert b"t0 " in got and gw.dispatcher.streams == 1
            a0.set()  # A's second token
            while b"t1 " not in got:
                got += await r.content.readany()
            assert calls == [], "held while alone"
            b = asyncio.create_task(_read(base, prompt="B"))  # B sends t0 and waits
            await _until(lambda: gw.dispatcher.streams == 2, "B relayed beside A")
            a1.set()  # A's third token: handed on while B is counted, a hold follows
            await _until(lambda: any(p == "A" for p, _, _ in calls), "A held once B joined")
            a2.set()  # the rest of A, up to its finish reason and [DONE]
            rest = [c async for c in r.content.iter_any()]
        texts = [t for e in _events([got, *rest]) if e != b"data: [DONE]" and (t := _text(e))]
        assert texts == [f"t{i} " for i in range(TOKENS)]
        b0.set()
        await b
        held_a = [(n, a_read) for p, n, a_read in calls if p == "A"]
        assert held_a
        for n, a_read in held_a:
            assert n >= 2, "held below min_streams"
            assert b"t1 " in a_read, "held before B joined"
            assert b'"finish_reason":"length"' not in a_read, "held after the finish reason"
        assert gw.dispatcher.streams == 0


async def test_streams_are_counted_per_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two gateways in one process, min_streams 2, one stream through each: both engines wait
    after their first token until each gateway relays its stream, so both are relayed at
    once, and neither gateway counts 2 or holds."""
    calls, _ = _count_holds(monkeypatch)
    go = asyncio.Event()
    gates = {PROMPT: [go]}  # shared by both engines
    async with (
        _gateway(500.0, min_streams=2, gates=gates) as (gw1, base1),
        _gateway(500.0, min_streams=2, gates=gates) as (gw2, base2),
    ):

        async def control() -> None:
            await _until(lambda: gw1.dispatcher.streams == gw2.dispatcher.streams == 1,
                         "both streams relayed at once")
            go.set()

        ctl = asyncio.create_task(control())
        (chunks1, _), (chunks2, _) = await asyncio.gather(_read(base1), _read(base2))
        await ctl
        for chunks in (chunks1, chunks2):
            texts = [t for e in _events(chunks) if e != b"data: [DONE]" and (t := _text(e))]
            assert texts == [f"t{i} " for i in range(TOKENS)]
        assert calls == [] and gw1.dispatcher.holds == gw2.dispatcher.holds == 0
        assert gw1.dispatcher.streams == gw2.dispatcher.streams == 0


@pytest.mark.parametrize("coalesce_ms", [0.0, 30.0])
async def test_the_count_is_back_to_0_after_an_upstream_error_mid_stream(
    coalesce_ms: float,
) -> None:
    """The engine sends the rest of its answer and drops the connection only after the test
    saw the stream counted."""
    go = asyncio.Event()
    async with _gateway(coalesce_ms, min_streams=1, gates={CUT: [go]}) as (gw, base):
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s,
            s.post(base + "/v1/completions", json={**COMPLETION, "prompt": CUT}) as r,
        ):
            assert r.status == 200
            first = await r.content.readany()
            assert b"t0 " in first
            assert gw.dispatcher.streams == 1
            go.set()
            rest = b"".join([c async for c in r.content.iter_any()])
        assert b'"error"' in rest  # the gateway ended the stream with an error event
        assert gw.metrics.registry.get_sample_value(
            "inferplane_stream_errors_total", {"endpoint": "e"}) == 1
        await _until_no_stream(gw)


@pytest.mark.parametrize("coalesce_ms", [0.0, 30.0])
async def test_the_count_is_back_to_0_after_the_client_goes(coalesce_ms: float) -> None:
    """The engine sends its second token only after the client went; meanwhile /metrics shows
    the stream relayed."""
    go = asyncio.Event()
    async with _gateway(coalesce_ms, min_streams=1, gates={PROMPT: [go]}) as (gw, base):
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s,
            s.post(base + "/v1/completions", json=COMPLETION) as r,
        ):
            assert r.status == 200
            assert b"t0 " in await r.content.readany()
            assert gw.dispatcher.streams == 1
            assert re.search(r"^inferplane_streams_relayed 1\.0$", await _scrape(base), re.M)
            r.close()  # the client drops the connection mid-stream
        go.set()
        await _until_no_stream(gw)
