"""`gateway.stream_coalesce_ms`: a stream's chunks after the first are relayed in groups, through
the real gateway over loopback, with nothing lost, the first chunk alone and the request
accounted as without it."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from aiohttp import web

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway, hash_key
from inferplane.config.loader import parse_config
from inferplane.dispatch import upstream
from inferplane.dispatch.answer import StreamStats
from tests.support.procs import free_port

KEY = "sk-coalesce"
TOKENS = 12


async def _engine(request: web.Request) -> web.StreamResponse:
    """Streams TOKENS text events, 10 ms apart after a 50 ms pause behind the first (a chat
    stream opens with a role-only chunk 1 ms before it), the last with a finish reason, then
    the usage chunk and [DONE] 20 ms later; each event as its own write."""
    body = orjson.loads(await request.read())
    chat = request.path.endswith("/chat/completions")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
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


async def _stack(coalesce_ms: float) -> tuple[Gateway, web.AppRunner, web.AppRunner, str]:
    up_port, gw_port = free_port(), free_port()
    app = web.Application()
    app.router.add_post("/v1/completions", _engine)
    app.router.add_post("/v1/chat/completions", _engine)
    app.router.add_get("/health", _health)
    up = web.AppRunner(app)
    await up.setup()
    await web.TCPSite(up, "127.0.0.1", up_port).start()
    config = parse_config(f"""
gateway: {{port: {gw_port}, stream_coalesce_ms: {coalesce_ms}, scrape_interval_s: 60,
           health_interval_s: 60}}
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


async def _stream(coalesce_ms: float, chat: bool = False
                  ) -> tuple[list[bytes], dict[str, object]]:
    """The chunks the client read, and the request's ledger outcome."""
    gw, runner, up, base = await _stack(coalesce_ms)
    path, body = ("/v1/chat/completions", CHAT) if chat else ("/v1/completions", COMPLETION)
    try:
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s,
            s.post(base + path, json=body) as r,
        ):
            assert r.status == 200, await r.text()
            chunks = [c async for c in r.content.iter_any()]
            did = r.headers["x-inferplane-decision-id"]
        outcome = gw.ledger.get(did)["outcome"]  # type: ignore[index]
        return chunks, outcome
    finally:
        await runner.cleanup()
        await up.cleanup()


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

    async def recorded(resp: aiohttp.ClientResponse, until: float) -> None:
        seen.append(b"".join(bytes(c) for c in read))
        await real_hold(resp, until)

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
