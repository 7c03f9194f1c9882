"""The open-loop client: send each request at its arrival time, time its stream.

Open loop means a request is sent at its (scaled) trace arrival time whatever happened to the
earlier ones, so a slow router builds a queue instead of slowing the offered load down. Each
request is timed at the client (``time.perf_counter``):

* TTFT -- from the send to the first SSE event carrying generated text;
* ITL -- the gaps between consecutive text-carrying events;
* E2E -- from the send to the end of the stream;
* output tokens -- ``usage.completion_tokens`` of the last chunk when the router passes it
  through, else the number of text-carrying events;
* the endpoint that answered, where the router names it (inferplane's
  ``x-inferplane-endpoint`` answer header; None for routers that do not say).

A non-200 status, a connection error, an ``error`` event, a timeout or a stream that ends
without any text is an error (the record keeps its message).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from bench.peers.workload import Planned
from inferplane.epp.protocol import ENDPOINT_HEADER


@dataclass(slots=True)
class Record:
    """The client's measurement of one request."""

    index: int
    sent_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    cached_tokens: int | None = None
    error: str | None = None
    status: int | None = None
    endpoint: str | None = None  # the router's ``x-inferplane-endpoint`` answer header

    @property
    def ok(self) -> bool:
        return self.error is None and self.ttft_s is not None


def chunk_text(chunk: Mapping[str, Any]) -> str:
    """The generated text an OpenAI stream chunk carries (chat ``delta.content`` or ``text``)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices:
        return ""
    c = choices[0]
    if not isinstance(c, dict):
        return ""
    delta = c.get("delta")
    if isinstance(delta, dict):
        content = delta.get("content")
        return content if isinstance(content, str) else ""
    text = c.get("text")
    return text if isinstance(text, str) else ""


class StreamTimer:
    """Feeds on SSE lines of one response and fills a :class:`Record` (no I/O: unit-testable)."""

    def __init__(self, record: Record, t0: float) -> None:
        self.rec, self.t0 = record, t0
        self._last: float | None = None
        self._events = 0
        self.done = False

    def line(self, raw: bytes, now: float) -> None:
        raw = raw.strip()
        if not raw.startswith(b"data:"):
            return
        data = raw[5:].strip()
        if data == b"[DONE]":
            self.done = True
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.rec.error = f"bad SSE data: {data[:80]!r}"
            return
        if not isinstance(chunk, dict):
            return
        if "error" in chunk:
            self.rec.error = f"stream error: {str(chunk['error'])[:200]}"
            return
        if chunk_text(chunk):
            self._events += 1
            if self._last is None:
                self.rec.ttft_s = now - self.t0
            else:
                self.rec.itl_s.append(now - self._last)
            self._last = now
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            n = usage.get("completion_tokens")
            if isinstance(n, int):
                self.rec.output_tokens = n
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                self.rec.cached_tokens = details["cached_tokens"]

    def finish(self, now: float) -> None:
        self.rec.e2e_s = now - self.t0
        if self.rec.output_tokens == 0:
            self.rec.output_tokens = self._events
        if self.rec.error is None and self.rec.ttft_s is None:
            self.rec.error = "stream ended without any generated text"


async def send(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    record: Record,
    timeout_s: float,
) -> Record:
    """POST ``body`` to ``url`` and time its stream into ``record``."""
    t0 = time.perf_counter()
    record.sent_s = t0
    timer = StreamTimer(record, t0)
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url, data=body, headers=headers) as resp:
                record.status = resp.status
                record.endpoint = resp.headers.get(ENDPOINT_HEADER)
                if resp.status != 200:
                    text = (await resp.read())[:300].decode("utf-8", "replace")
                    record.error = f"HTTP {resp.status}: {text}"
                    return record
                async for raw in resp.content:
                    timer.line(raw, time.perf_counter())
    except TimeoutError:
        record.error = f"timeout after {timeout_s:.0f}s"
    except asyncio.CancelledError:
        record.error = "cancelled at the phase deadline"
        raise
    except aiohttp.ClientError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        timer.finish(time.perf_counter())
    return record


async def replay(
    base_url: str,
    planned: Sequence[Planned],
    bodies: Sequence[bytes],
    path: str,
    headers: Mapping[str, str],
    *,
    request_timeout_s: float,
    deadline_s: float,
) -> tuple[list[Record], float]:
    """Send every planned request at its arrival time; return the records and the wall time.

    Requests still running ``deadline_s`` after the start are cancelled and recorded as errors.
    """
    url = base_url.rstrip("/") + path
    hdrs = {"Content-Type": "application/json", **headers}
    records = [Record(p.index) for p in planned]
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        t_start = time.perf_counter()

        async def one(p: Planned, rec: Record, b: bytes) -> None:
            delay = t_start + p.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await send(session, url, b, hdrs, rec, request_timeout_s)

        tasks = [
            asyncio.create_task(one(p, r, b))
            for p, r, b in zip(planned, records, bodies, strict=True)
        ]
        _, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for t in pending:
            t.cancel()
        for t in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for r in records:
            if r.error is None and r.e2e_s is None:  # never sent
                r.error = "cancelled at the phase deadline"
        wall = time.perf_counter() - t_start
    return records, wall
