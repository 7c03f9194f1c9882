"""bench/peers/burst_timeline.py: one gateway's steps, and its garbage collections, in bursts.

    python bench/peers/burst_timeline.py [--burst 10] [--bursts 3] [--gap-s 2] [--freeze]

Starts `bench/peers/fake_engine.py` (answers after 150 ms, whatever the load) and, in this
process on uvloop, a gateway with ``gateway_gap.py``'s fleet file in front of it; a client
subprocess sends ``--bursts`` bursts of ``--burst`` bench requests at once (the trace's shape),
``--gap-s`` apart. Printed: each burst's TTFTs at the client; for the last burst, when each
request's handler started, its body was read, it was classified, admitted, handed to aiohttp
(``upstream send``), when aiohttp's writer started putting its bytes on the wire (``bytes
written``: on Python < 3.12 a task of its own), and when the status line and the first chunk came
back (ms from the burst's first handler start);
and every garbage collection over 5 ms (from ``gc.callbacks``: when, how long, which
generation). ``--freeze`` calls `inferplane.core.reload.freeze_heap` after start-up, as
``inferplane serve`` does by default (``gateway.gc_freeze``); without it the heap is as it was.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
for _p in (str(ROOT / "src"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import aiohttp  # noqa: E402
import uvloop  # noqa: E402

import inferplane.api.app as appmod  # noqa: E402
from bench.peers import real_engines  # noqa: E402
from bench.peers.gateway_gap import gateway_config, start_fake  # noqa: E402
from bench.peers.procs import free_port  # noqa: E402
from inferplane.api.pipeline import Gateway  # noqa: E402
from inferplane.config.loader import load_config  # noqa: E402
from inferplane.core.reload import freeze_heap  # noqa: E402
from inferplane.dispatch.upstream import Dispatcher  # noqa: E402

_write_bytes = aiohttp.ClientRequest.write_bytes


async def write_bytes(self: aiohttp.ClientRequest, *args: Any, **kwargs: Any) -> None:
    """aiohttp writes a request's buffered head and its body from this coroutine: a task of
    its own on Python < 3.12, which runs when the loop gets to it. Its start is the request's
    "bytes written"; the task is not the handler's, so it is credited to the last request that
    called `Dispatcher.open` and has not been marked yet."""
    pending = [i for i, t in SENT.items() if t is None]
    if pending:
        SENT[pending[0]] = time.perf_counter()
    await _write_bytes(self, *args, **kwargs)


SENT: dict[int, float | None] = {}

STEPS = ["handler", "body read", "classified", "admitted", "upstream send", "bytes written",
         "status line", "first chunk"]
EVENTS: list[tuple[float, int, str]] = []
TASKS: dict[int, int] = {}
COLLECTIONS: list[tuple[float, float, int]] = []
_gc_start = [0.0]


def mark(step: str) -> None:
    task = asyncio.current_task()
    EVENTS.append((time.perf_counter(), TASKS.setdefault(id(task), len(TASKS)), step))


def on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_start[0] = time.perf_counter()
    else:
        COLLECTIONS.append((_gc_start[0], time.perf_counter() - _gc_start[0],
                            int(info["generation"])))


def wrap(fn: Callable[..., Awaitable[Any]], before: str | None, after: str
         ) -> Callable[..., Awaitable[Any]]:
    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        if before:
            mark(before)
        result = await fn(*args, **kwargs)
        mark(after)
        return result
    return wrapped


CLIENT = """
import asyncio, sys
import aiohttp
from bench.peers import client, real_engines
from bench.peers.gateway_gap import HEADERS, TRACE
from bench.peers.workload import SliceSpec, encode_bodies, plan
from inferplane.twin.traces.loader import load_trace
port, n, bursts, gap = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
planned, _ = plan(load_trace(TRACE), SliceSpec(0, 60, 1 / 3, 1.0, max_output=16))
bodies = encode_bodies(planned, "completion-text", real_engines.MODEL, real_engines.BLOCK)
hdrs = {"Content-Type": "application/json", **HEADERS}
async def main():
    async with aiohttp.ClientSession() as s:
        for b in range(bursts):
            recs = [client.Record(i) for i in range(n)]
            await asyncio.gather(*(client.send(s, f"http://127.0.0.1:{port}/v1/completions",
                                               bodies[(b * n + i) % len(bodies)], hdrs, recs[i],
                                               30) for i in range(n)))
            print(f"burst {b}: TTFT ms", sorted(round(1e3 * r.ttft_s) for r in recs if r.ttft_s),
                  flush=True)
            await asyncio.sleep(gap)
asyncio.run(main())
"""


async def run(a: argparse.Namespace, port: int, config: Path) -> None:
    gw = Gateway(load_config(config))
    classify = gw.classify

    def classified(*args: Any, **kwargs: Any) -> Any:
        result = classify(*args, **kwargs)
        mark("classified")
        return result

    gw.classify = classified  # type: ignore[method-assign]
    runner = await appmod.serve(gw, "127.0.0.1", port)
    gw.admission.admit = wrap(gw.admission.admit, None, "admitted")  # type: ignore[method-assign,assignment]
    if a.freeze:
        freeze_heap(True)
    print(f"gc.freeze: {gc.get_freeze_count()} objects frozen", flush=True)
    await asyncio.sleep(1.0)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, str(port), str(a.burst), str(a.bursts), str(a.gap_s),
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"})
    await proc.wait()
    await runner.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=10)
    ap.add_argument("--bursts", type=int, default=3)
    ap.add_argument("--gap-s", type=float, default=2.0)
    ap.add_argument("--freeze", action="store_true")
    a = ap.parse_args()
    appmod._read_body = wrap(appmod._read_body, "handler", "body read")  # type: ignore[assignment]
    opened = wrap(Dispatcher.open, "upstream send", "status line")

    async def open_(*args: Any, **kwargs: Any) -> Any:
        SENT[TASKS.setdefault(id(asyncio.current_task()), len(TASKS))] = None
        return await opened(*args, **kwargs)

    Dispatcher.open = open_  # type: ignore[method-assign]
    aiohttp.ClientRequest.write_bytes = write_bytes  # type: ignore[method-assign]
    Dispatcher.first_chunk = staticmethod(  # type: ignore[method-assign,assignment]
        wrap(Dispatcher.first_chunk, None, "first chunk"))
    gc.callbacks.append(on_gc)
    work = Path(tempfile.mkdtemp(prefix="ip-burst-"))
    try:
        engine = start_fake(0.15, work)
        port = free_port()
        uvloop.run(run(a, port, gateway_config([engine], port, "", work, "timeline")))
    finally:
        real_engines.stop_engines()
    starts = sorted(t for t, _, step in EVENTS if step == "handler")
    if not starts:
        return 1
    t0 = starts[-a.burst]  # the last burst's first handler start
    rows: dict[int, dict[str, float]] = {}
    for t, i, step in EVENTS:
        if t >= t0:
            rows.setdefault(i, {})[step] = 1e3 * (t - t0)
    for i, sent_at in SENT.items():
        if sent_at is not None and sent_at >= t0 and i in rows:
            rows[i]["bytes written"] = 1e3 * (sent_at - t0)
    print("\nthe last burst, ms from its first handler start:")
    print("| " + " | ".join(STEPS) + " |")
    print("|" + "---|" * len(STEPS))
    for r in sorted(rows.values(), key=lambda r: r.get("handler", 1e9)):
        print("| " + " | ".join(f"{r.get(s, float('nan')):.1f}" for s in STEPS) + " |")
    print("\ncollections over 5 ms (s from the first request's handler start, ms, generation):")
    for at, d, gen in COLLECTIONS:
        if d > 0.005:
            print(f"  {at - starts[0]:+.2f} s  {1e3 * d:.1f} ms  gen {gen}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
