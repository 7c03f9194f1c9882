"""A router's added latency over calling one emulated endpoint directly.

Measured against a *fast* emulated fleet (the same fleet file at a time scale of 1000, so engine
time is negligible), like ``bench/overhead.py``: small requests (20-word prompt, 5 output
tokens) sent directly to the first endpoint and through the router, interleaved so both paths
see the same machine noise. Modes:

* ``seq`` -- one request at a time over a reused keep-alive connection, streaming and not;
* ``seq-fresh`` -- one at a time, a new TCP connection per request (streaming): with ``seq`` it
  exposes connection-reuse artefacts, e.g. a constant ~40 ms first-chunk delay on reused
  connections only (Nagle + delayed ACK on a proxy's upstream or downstream socket);
* ``c32`` -- 32 concurrent clients over reused connections, streaming and not.

For every mode: p50/p99 of the total time and, streaming, of the first chunk; ``added`` is the
router's percentile minus the direct one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from bench.peers.metrics import pct
from bench.peers.workload import PATHS, Form
from inferplane.twin.traces.tokens import token_ids


@dataclass(frozen=True)
class Mode:
    name: str
    concurrency: int
    stream: bool
    fresh: bool = False


MODES: tuple[Mode, ...] = (
    Mode("seq", 1, False),
    Mode("seq", 1, True),
    Mode("seq-fresh", 1, True, fresh=True),
    Mode("c32", 32, False),
    Mode("c32", 32, True),
)


def small_body(form: Form, model: str, stream: bool, i: int) -> bytes:
    words = " ".join(["hello"] * 19 + [str(i % 997)])
    b: dict[str, Any] = {"model": model, "max_tokens": 5, "stream": stream, "temperature": 0.0}
    if stream:
        b["stream_options"] = {"include_usage": True}
    if form == "chat-text":
        b["messages"] = [{"role": "user", "content": words}]
    elif form == "completion-ids":
        b["prompt"] = token_ids(words)
    else:
        b["prompt"] = words
    return orjson.dumps(b)


async def _one(session: aiohttp.ClientSession, url: str, body: bytes,
               headers: Mapping[str, str]) -> tuple[float, float]:
    """(total seconds, first-chunk seconds) of one request."""
    t0 = time.perf_counter()
    first = None
    async with session.post(url, data=body, headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {(await r.read())[:200]!r}")
        async for _chunk in r.content.iter_any():
            if first is None:
                first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return total, first if first is not None else total


async def measure(direct: str, router: str, form: Form, model: str,
                  router_headers: Mapping[str, str], *, n_seq: int, n_conc: int,
                  deadline_s: float) -> list[dict[str, Any]]:
    """Every mode of :data:`MODES`; stops early (marking the rows) at ``deadline_s``."""
    path = PATHS[form]
    urls = {"direct": direct.rstrip("/") + path, "router": router.rstrip("/") + path}
    hdrs = {"direct": {"Content-Type": "application/json"},
            "router": {"Content-Type": "application/json", **router_headers}}
    t_end = time.monotonic() + deadline_s
    rows: list[dict[str, Any]] = []
    for mode in MODES:
        if time.monotonic() > t_end:
            rows.append({"mode": mode.name, "stream": mode.stream, "skipped": "time limit"})
            continue
        try:
            res = await asyncio.wait_for(
                _mode(urls, hdrs, form, model, mode, n_seq, n_conc),
                timeout=max(1.0, t_end - time.monotonic()))
        except (TimeoutError, RuntimeError, aiohttp.ClientError) as exc:
            rows.append({"mode": mode.name, "stream": mode.stream,
                         "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        rows.append(row(mode, res))
    return rows


def row(mode: Mode, res: Mapping[str, Sequence[tuple[float, float]]]) -> dict[str, Any]:
    """Percentiles (ms) of both paths and the router's added latency."""
    out: dict[str, Any] = {"mode": mode.name, "stream": mode.stream,
                           "concurrency": mode.concurrency, "n": len(res["router"])}
    for what, idx in (("total", 0), ("first", 1)):
        if what == "first" and not mode.stream:
            continue
        for q in (50, 99):
            d = pct([x[idx] for x in res["direct"]], q)
            r = pct([x[idx] for x in res["router"]], q)
            out[f"direct_{what}_p{q}_ms"] = None if d is None else d * 1e3
            out[f"router_{what}_p{q}_ms"] = None if r is None else r * 1e3
            out[f"added_{what}_p{q}_ms"] = None if d is None or r is None else (r - d) * 1e3
    return out


async def _mode(urls: Mapping[str, str], hdrs: Mapping[str, Mapping[str, str]], form: Form,
                model: str, mode: Mode, n_seq: int, n_conc: int
                ) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in urls}
    conn = aiohttp.TCPConnector(limit=0, force_close=mode.fresh)
    async with aiohttp.ClientSession(connector=conn) as session:
        for i in range(10):  # warm-up (opens the keep-alive connections)
            for k in urls:
                await _one(session, urls[k], small_body(form, model, mode.stream, i), hdrs[k])
        if mode.concurrency == 1:
            for i in range(n_seq):
                order = list(urls) if i % 2 == 0 else list(reversed(list(urls)))
                for k in order:
                    body = small_body(form, model, mode.stream, i)
                    out[k].append(await _one(session, urls[k], body, hdrs[k]))
            return out
        for rep in range(2):  # alternate which path goes first
            order = list(urls) if rep == 0 else list(reversed(list(urls)))
            for k in order:
                sem = asyncio.Semaphore(mode.concurrency)

                async def limited(i: int, key: str = k, s: asyncio.Semaphore = sem) -> None:
                    async with s:
                        body = small_body(form, model, mode.stream, i)
                        out[key].append(await _one(session, urls[key], body, hdrs[key]))

                await asyncio.gather(*(limited(i) for i in range(n_conc // 2)))
    return out
