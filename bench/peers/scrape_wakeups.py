"""bench/peers/scrape_wakeups.py: the gateway's CPU and wake-ups, idle and under a small load.

    python bench/peers/scrape_wakeups.py [--engines 3] [--idle-s 60] [--load-s 60] [--rps 3]
                                         [--reps 2] [--tree NAME=PATH ...]
                                         [--variant NAME=PATH:VALUE,... ...]

Starts ``--engines`` stand-in engines (`fake_engine.py`, answering after 0.15 s; their
``/metrics`` page always shows an empty queue) and, for each tree (a checkout whose ``src`` the
gateway runs: e.g. a copy of main and this branch) and each variant (fleet-file fields, as in
``gateway_gap.py``), one after another and in the reverse order every other repetition, a
gateway with the fleet file ``gateway_gap.py`` writes. Over ``--idle-s`` with no request, then
over ``--load-s`` while a client sends ``--rps`` streamed completions a second (evenly spaced,
open loop), it reads the gateway's CPU seconds (``/proc/PID/stat``, all threads) and context
switches (voluntary + involuntary, all threads: each sleep the event loop wakes from is one),
and counts the ``GET /metrics`` the engines logged (scrapes). The gateway's CPU is reported
per second of the window (ms/s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
for _p in (str(ROOT / "src"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench.peers import real_engines  # noqa: E402
from bench.peers.gateway_gap import (  # noqa: E402
    HEADERS,
    gateway_config,
    proc_cpu_s,
    start_fake,
    start_gateway,
    switches,
)
from bench.peers.procs import free_port  # noqa: E402


def scrapes(logs: list[Path]) -> int:
    return sum(p.read_text().count('"GET /metrics ') for p in logs)


async def steady_load(base: str, rps: float, seconds: float) -> tuple[int, int]:
    """``rps`` streamed completions a second for ``seconds`` (open loop); (sent, ok)."""
    body = {"model": real_engines.MODEL, "prompt": "hello " * 64, "max_tokens": 16,
            "stream": True}
    ok = 0

    async def one(c: httpx.AsyncClient) -> None:
        nonlocal ok
        async with c.stream("POST", f"{base}/v1/completions", json=body,
                            headers=HEADERS) as r:
            async for _ in r.aiter_bytes():
                pass
            ok += r.status_code == 200

    n = int(rps * seconds)
    async with httpx.AsyncClient(timeout=30) as c:
        t0 = time.monotonic()
        tasks = []
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + i / rps - time.monotonic()))
            tasks.append(asyncio.create_task(one(c)))
        await asyncio.sleep(max(0.0, t0 + seconds - time.monotonic()))
        await asyncio.gather(*tasks, return_exceptions=True)
    return n, ok


def window(pid: int, logs: list[Path], seconds: float, load: tuple[str, float] | None
           ) -> dict[str, float]:
    c0, s0, n0, t0 = proc_cpu_s(pid), switches(pid), scrapes(logs), time.monotonic()
    sent = ok = 0
    if load is None:
        time.sleep(seconds)
    else:
        sent, ok = asyncio.run(steady_load(load[0], load[1], seconds))
    wall = time.monotonic() - t0
    return {"cpu_ms_per_s": 1e3 * (proc_cpu_s(pid) - c0) / wall,
            "switches_per_s": (switches(pid) - s0) / wall,
            "scrapes_per_s": (scrapes(logs) - n0) / wall, "sent": sent, "ok": ok,
            "wall_s": wall, "load": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", type=int, default=3)
    ap.add_argument("--idle-s", type=float, default=60.0)
    ap.add_argument("--load-s", type=float, default=60.0)
    ap.add_argument("--rps", type=float, default=3.0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                    help="a checkout whose src the gateway runs (default: this one)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=PATH:VALUE,...",
                    help="fleet-file fields (default: current=, the fleet file as written)")
    a = ap.parse_args(argv)
    trees = {k: Path(v).resolve() for k, v in
             (t.split("=", 1) for t in (a.tree or [f"this={ROOT}"]))}
    variants = dict(v.split("=", 1) for v in (a.variant or ["current="]))
    runs = [(t, v) for v in variants for t in trees]
    work = Path(tempfile.mkdtemp(prefix="ip-wakeups-"))
    rows: dict[tuple[str, str], list[dict[str, dict[str, float]]]] = {r: [] for r in runs}
    try:
        engines = [start_fake(0.15, work, i) for i in range(a.engines)]
        logs = [work / f"vllm{i}.log" for i in range(a.engines)]
        for p in logs:
            p.touch()
        for rep in range(a.reps):
            for tree, var in runs if rep % 2 == 0 else runs[::-1]:
                port = free_port()
                cfg = gateway_config(engines, port, variants[var], work, f"{tree}-{var}-{rep}")
                gw = start_gateway(cfg, work / f"gateway-{tree}-{var}-{rep}.log",
                                   tree=trees[tree])
                try:
                    time.sleep(3)
                    idle = window(gw.pid, logs, a.idle_s, None)
                    busy = window(gw.pid, logs, a.load_s, (f"http://127.0.0.1:{port}", a.rps))
                finally:
                    gw.terminate()
                    try:
                        gw.wait(15)
                    except subprocess.TimeoutExpired:
                        gw.kill()
                        gw.wait()
                rows[(tree, var)].append({"idle": idle, "load": busy})
                for phase, r in (("idle", idle), ("load", busy)):
                    print(f"rep {rep} {tree:8s} {var:12s} {phase}: " + ", ".join(
                        f"{k} {v:.2f}" for k, v in r.items()), flush=True)
        print("\nmedians over the repetitions (gateway CPU ms per s, context switches per s, "
              "scrapes per s of all engines):")
        print("| tree | variant | idle CPU ms/s | idle switches/s | idle scrapes/s "
              "| load CPU ms/s | load switches/s | load scrapes/s | load ok/sent |")
        print("|---|---|---|---|---|---|---|---|---|")
        for (tree, var), rs in rows.items():
            def med(phase: str, k: str, rs: list[dict[str, dict[str, float]]] = rs) -> float:
                return statistics.median(r[phase][k] for r in rs)
            print(f"| {tree} | {var} | {med('idle', 'cpu_ms_per_s'):.1f} | "
                  f"{med('idle', 'switches_per_s'):.1f} | {med('idle', 'scrapes_per_s'):.2f} | "
                  f"{med('load', 'cpu_ms_per_s'):.1f} | {med('load', 'switches_per_s'):.1f} | "
                  f"{med('load', 'scrapes_per_s'):.2f} | "
                  f"{med('load', 'ok'):.0f}/{med('load', 'sent'):.0f} |")
    finally:
        real_engines.stop_engines()
    return 0


if __name__ == "__main__":
    sys.exit(main())
