"""bench/peers/burst_transit.py: how long a request takes to get through a router, in bursts.

    python bench/peers/burst_transit.py [--duration 60] [--rate-scale 1] [--engines 3]
                                        [--ttft-s 0.15] [--reps 1] [--variant NAME=PATH:VALUE,...]
                                        [--python NAME=PATH]

Starts ``--engines`` stand-in engines (`fake_engine.py`: every request answered after
``--ttft-s``, whatever the load, each logging when a request arrived and when its first event
left, ``--arrivals``) and replays the real-engine bench's slice of the Mooncake trace (its text
prompts, its bursts: all the requests of one trace second at the same instant) open-loop,
**straight to the engines** (request *i* to engine *i* mod N) and **through the inferplane
gateway** in each variant (the fleet file ``real_engines.py`` writes, with KV events and the
tiny model's tokenizer; a variant changes it at dotted keys as in ``gateway_gap.py``), one path
at a time, alternating the order between repetitions. Per path and repetition:

- ``ttft``: the client's time to first token (P50 / P90 ms);
- ``in``: from the client's send to the engine's handler start (the way in: the client's own
  burst, the router, the connection);
- ``out``: from the engine's first event to the client's first token (the way back);
- the gateway's CPU seconds over the replay.

The client and the engines stamp times with ``time.perf_counter`` (on Linux one monotonic
clock for every process), and a request's prompt matches the client's record to the engine's
line. Straight to the engines, ``in`` is what the client alone costs; what a router adds is its
row less that one. The Rust routers run in the same way with ``real_engines.py --urls`` in front
of the same stand-ins, which gives their TTFT but not the split (docs/benchmarks.md, "The
gateway's burst on real engines").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[2]
for _p in (str(ROOT / "src"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench.peers import client, real_engines  # noqa: E402
from bench.peers.fake_engine import prompt_key  # noqa: E402
from bench.peers.gateway_gap import (  # noqa: E402
    HEADERS,
    bench_slice,
    gateway_config,
    proc_cpu_s,
    start_fake,
    start_gateway,
)
from bench.peers.procs import free_port  # noqa: E402


def start_engines(n: int, ttft_s: float, work: Path) -> list[tuple[tuple[str, str], Path]]:
    """``n`` stand-in engines, each with its arrivals file; returns ((url, KV-event endpoint),
    file)."""
    out = []
    for i in range(n):
        arrivals = work / f"arrivals{i}.txt"
        arrivals.touch()
        out.append((start_fake(ttft_s, work, i, arrivals), arrivals))
    return out


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def split(records: list[client.Record], bodies: list[bytes],
          arrival_files: list[Path]) -> dict[str, float]:
    """TTFT, the way in and the way out (P50 / P90 ms) of the requests matched to an engine."""
    seen: dict[str, tuple[float, float]] = {}
    for f in arrival_files:
        for line in f.read_text().splitlines():
            key, arrived, first = line.split()
            seen[key] = (float(arrived), float(first))
    ttft, way_in, way_out = [], [], []
    for rec, body in zip(records, bodies, strict=True):
        got = seen.get(prompt_key(orjson.loads(body).get("prompt")))
        if got is None or not rec.ok or rec.ttft_s is None:
            continue
        ttft.append(1e3 * rec.ttft_s)
        way_in.append(1e3 * (got[0] - rec.sent_s))
        way_out.append(1e3 * (rec.sent_s + rec.ttft_s - got[1]))
    return {"matched": len(ttft), "ttft_p50": pct(ttft, 0.5), "ttft_p90": pct(ttft, 0.9),
            "in_p50": pct(way_in, 0.5), "in_p90": pct(way_in, 0.9),
            "in_max": max(way_in, default=float("nan")),
            "out_p50": pct(way_out, 0.5), "out_p90": pct(way_out, 0.9)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", type=float, default=0.0)
    ap.add_argument("--duration", type=float, default=60.0, help="trace seconds")
    ap.add_argument("--rate-scale", type=float, default=1.0)
    ap.add_argument("--engines", type=int, default=3)
    ap.add_argument("--ttft-s", type=float, default=0.15)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=PATH:VALUE,... (default: current=, the fleet file as written)")
    ap.add_argument("--python", action="append", default=[], metavar="NAME=PATH",
                    help="run variant NAME's gateway with the interpreter PATH")
    a = ap.parse_args(argv)
    variants = dict(v.split("=", 1) for v in (a.variant or ["current="]))
    pythons = dict(v.split("=", 1) for v in a.python)
    work = Path(tempfile.mkdtemp(prefix="ip-transit-"))
    planned, bodies = bench_slice(a.start, a.duration, a.rate_scale)
    print(f"{len(planned)} requests over {planned[-1].arrival_s:.0f} s, {a.engines} stand-in "
          f"engines answering after {a.ttft_s * 1e3:.0f} ms; load {os.getloadavg()[0]:.1f}; "
          f"work {work}", flush=True)
    engines = start_engines(a.engines, a.ttft_s, work)
    urls = [url for (url, _), _ in engines]
    files = [f for _, f in engines]
    rows: dict[str, list[dict[str, float]]] = {n: [] for n in ["direct", *variants]}
    try:
        for rep in range(a.reps):
            for name in list(rows) if rep % 2 == 0 else list(rows)[::-1]:
                for f in files:
                    f.write_text("")
                gw, cpu = None, 0.0
                try:
                    if name == "direct":
                        records, sent = asyncio.run(_direct(urls, planned, bodies))
                    else:
                        port = free_port()
                        conf = gateway_config([e for e, _ in engines], port, variants[name],
                                              work, name)
                        gw = start_gateway(conf, work / f"gateway-{name}-{rep}.log",
                                           pythons.get(name, sys.executable))
                        c0 = proc_cpu_s(gw.pid)
                        records, _ = asyncio.run(client.replay(
                            f"http://127.0.0.1:{port}", planned, bodies, "/v1/completions",
                            HEADERS, request_timeout_s=60,
                            deadline_s=planned[-1].arrival_s + 30))
                        cpu = proc_cpu_s(gw.pid) - c0
                        sent = bodies
                finally:
                    if gw is not None:
                        gw.terminate()
                        gw.wait(15)
                row = {**split(records, sent, files), "gateway_cpu_s": cpu,
                       "load": os.getloadavg()[0]}
                rows[name].append(row)
                print(f"rep {rep} {name:12s} " + ", ".join(
                    f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    finally:
        for p in real_engines.PROCS:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    print("\nmedians over the repetitions (ms; gateway CPU in s):")
    print("| path | TTFT p50 | TTFT p90 | in p50 | in p90 | in max | out p50 | out p90 "
          "| gateway CPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rs in rows.items():
        def med(k: str, rs: list[dict[str, float]] = rs) -> float:
            return statistics.median(r[k] for r in rs)
        print(f"| {name} | {med('ttft_p50'):.1f} | {med('ttft_p90'):.1f} | {med('in_p50'):.2f} | "
              f"{med('in_p90'):.2f} | {med('in_max'):.1f} | {med('out_p50'):.2f} | "
              f"{med('out_p90'):.2f} | {med('gateway_cpu_s'):.2f} |")
    return 0


async def _direct(urls: list[str], planned: list[Any], bodies: list[bytes]
                  ) -> tuple[list[client.Record], list[bytes]]:
    """Request *i* straight to engine *i* mod N, each engine's share on its own schedule."""
    n = len(urls)
    outs = await asyncio.gather(*(
        client.replay(u, planned[i::n], bodies[i::n], "/v1/completions", HEADERS,
                      request_timeout_s=60, deadline_s=planned[-1].arrival_s + 30)
        for i, u in enumerate(urls)))
    records = [r for recs, _ in outs for r in recs]
    sent = [b for i in range(n) for b in bodies[i::n]]
    return records, sent


if __name__ == "__main__":
    sys.exit(main())
