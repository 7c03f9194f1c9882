"""A fake OpenAI completions engine for the calibration probe's tests: every streamed request
answers at once (one token per chunk, ``token_gap_s`` apart, then the usage), except the first
request on each new connection, which waits ``new_connection_s`` first — what opening a
connection costs a request on a real engine's HTTP front end. ``keepalive_s``: the server
closes a connection idle that long (vLLM's uvicorn: 5 s). ``prefill_s_per_word``: each request
waits that long per prompt word before its first token (a longer prompt answers later, so that
concurrent requests can finish out of the order they were sent in). ``slow_for(n, factor)``: the
next ``n`` requests to arrive wait ``factor`` times as long per word (a host that turns slow for a
stretch). ``wake_s``: a request that arrives with no request in flight for ``idle_after_s``
(or none ever) waits that much more before its first token (an engine waking from idle).
``after_stream_factor``: a request that arrives when the last request to end had streamed more
than one token prefills that many times slower per word (the fidelity vLLM's cold prefill right
after a stream, against right after a one-token request). Each request is recorded as (prompt
words, max_tokens, first on its connection), in the order they arrive, in ``woken`` whether it
paid ``wake_s`` and in ``after_stream`` whether the last request to end before it had streamed
more than one token (read from its requested ``max_tokens``: this fake always streams them all)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class FakeCompletions:
    new_connection_s: float = 0.0
    token_gap_s: float = 0.0  # between a stream's chunks
    prefill_s_per_word: float = 0.0  # before the first token, per prompt word
    requests: list[tuple[int, int, bool]] = field(default_factory=list)
    _seen: list[Any] = field(default_factory=list)  # the transports served so far
    _slow_left: int = 0  # requests still to arrive in the slow state
    _slow_factor: float = 1.0
    wake_s: float = 0.0
    idle_after_s: float = 0.05
    woken: list[bool] = field(default_factory=list)  # per request in ``requests``
    _inflight: int = 0
    _last_end: float = float("-inf")  # loop time the last request in flight ended
    after_stream_factor: float = 1.0
    after_stream: list[bool] = field(default_factory=list)  # per request in ``requests``
    _last_streamed: bool = False  # the last request to end had more than one output token

    def slow_for(self, n: int, factor: float) -> None:
        """The next ``n`` requests to arrive prefill ``factor`` times slower."""
        self._slow_left, self._slow_factor = n, factor

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        words = len(body["prompt"].split())
        transport = request.transport
        first = transport not in self._seen
        if first:
            self._seen.append(transport)
        self.requests.append((words, int(body["max_tokens"]), first))
        now = asyncio.get_running_loop().time()
        woken = self.wake_s > 0 and not self._inflight and now - self._last_end >= self.idle_after_s
        self.woken.append(woken)
        self.after_stream.append(self._last_streamed)
        slower = self.after_stream_factor if self._last_streamed else 1.0
        self._inflight += 1
        try:
            return await self._answer(request, body, words, first, woken, slower)
        finally:
            self._last_streamed = int(body["max_tokens"]) > 1
            self._inflight -= 1
            if not self._inflight:
                self._last_end = asyncio.get_running_loop().time()

    async def _answer(
        self, request: web.Request, body: Any, words: int, first: bool, woken: bool,
        slower: float = 1.0,
    ) -> web.StreamResponse:
        if woken:
            await asyncio.sleep(self.wake_s)
        if first and self.new_connection_s > 0:
            await asyncio.sleep(self.new_connection_s)
        factor = slower
        if self._slow_left > 0:
            self._slow_left -= 1
            factor *= self._slow_factor
        if self.prefill_s_per_word > 0:
            await asyncio.sleep(words * self.prefill_s_per_word * factor)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = int(body["max_tokens"])
        for i in range(n):
            if i and self.token_gap_s > 0:
                await asyncio.sleep(self.token_gap_s)
            chunk = {"choices": [{"text": " x", "finish_reason": "length" if i == n - 1
                                  else None}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        usage = {"choices": [], "usage": {"prompt_tokens": words, "completion_tokens": n}}
        await resp.write(b"data: " + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp


@asynccontextmanager
async def fake_completions(
    new_connection_s: float = 0.0,
    keepalive_s: float = 75.0,
    token_gap_s: float = 0.0,
    prefill_s_per_word: float = 0.0,
    wake_s: float = 0.0,
    idle_after_s: float = 0.05,
    after_stream_factor: float = 1.0,
) -> AsyncIterator[tuple[str, FakeCompletions]]:
    """Serve a :class:`FakeCompletions` on a free local port: yields (base URL, the fake)."""
    fake = FakeCompletions(new_connection_s, token_gap_s, prefill_s_per_word,
                           wake_s=wake_s, idle_after_s=idle_after_s,
                           after_stream_factor=after_stream_factor)
    app = web.Application()
    app.router.add_post("/v1/completions", fake.handle)
    runner = web.AppRunner(app, keepalive_timeout=keepalive_s)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", fake
    finally:
        await runner.cleanup()
