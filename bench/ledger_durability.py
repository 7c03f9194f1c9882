"""The cost and the effect of durable decision records (issue 12 item 8), side by side.

Three gateways, each a real process in front of the same fast fake upstream, in one run:

- ``memory``: records in memory (nothing on disk: the floor);
- ``sqlite, background``: ``ledger.durable: false`` — the writer commits every 0.2 s, answers
  never wait (the behaviour before group commit);
- ``sqlite, durable``: ``ledger.durable: true`` (the default) — every answer waits for its
  record's commit; the writer group-commits.

For each: ``--requests`` non-streamed requests at concurrency ``--concurrency`` (req/s, client
p50 / p99), then a kill -9 run (load until ``--kill-after`` answers, SIGKILL, count the answered
requests whose record is not in the file). Alternating rounds (``--rounds``) so the machine's
noise hits every configuration alike.

    .venv/bin/python bench/ledger_durability.py --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.support.procs import Proc, free_port  # noqa: E402
from tests.test_ledger_durability import KEY, fleet, load_then_kill, recorded  # noqa: E402

MODES = {"memory": None, "sqlite, background": False, "sqlite, durable": True}


def config(mode: str, gw_port: int, up_port: int, tmp: Path) -> Path:
    durable = MODES[mode]
    ledger = tmp / f"{mode.replace(', ', '-')}-{gw_port}.db"
    text = fleet(gw_port, up_port, ledger, bool(durable))
    if durable is None:
        text = text.replace(f", ledger_path: {ledger}", "")
    path = tmp / f"fleet-{gw_port}.yaml"
    path.write_text(text)
    return path


async def throughput(base: str, n: int, concurrency: int) -> tuple[float, list[float]]:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    lat: list[float] = []
    todo = iter(range(n))

    async def worker(c: httpx.AsyncClient) -> None:
        for _ in todo:
            t0 = time.perf_counter()
            r = await c.post("/v1/chat/completions", json=body)
            lat.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {KEY}"},
                                 timeout=30, limits=limits) as c:
        for _ in range(50):  # warm-up
            await c.post("/v1/chat/completions", json=body)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
        return n / (time.perf_counter() - t0), lat


def run_one(mode: str, up_port: int, tmp: Path, a: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    for phase in ("load", "kill"):
        gw_port = free_port()
        cfg = config(mode, gw_port, up_port, tmp)
        gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg)],
                  tmp / f"gw-{gw_port}.log")
        base = f"http://127.0.0.1:{gw_port}"
        try:
            gw.wait_http(f"{base}/ready")
            if phase == "load":
                rps, lat = asyncio.run(throughput(base, a.requests, a.concurrency))
                lat.sort()
                out["rps"] = rps
                out["p50"] = statistics.median(lat) * 1e3
                out["p99"] = lat[int(0.99 * (len(lat) - 1))] * 1e3
            elif MODES[mode] is not None:
                answered = asyncio.run(load_then_kill(base, gw, concurrency=a.concurrency,
                                                      kill_after=a.kill_after))
                gw.p.wait(10)
                ledger = cfg.read_text().split("ledger_path: ")[1].split("}")[0]
                out["answered"] = len(answered)
                out["lost"] = len(set(answered) - recorded(Path(ledger)))
        finally:
            gw.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--kill-after", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ledger-durability-"))
    up_port = free_port()
    up = Proc(["-m", "tests.support.fake_upstream", "--port", str(up_port), "--mode", "fast"],
              tmp / "up.log")
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    try:
        up.wait_http(f"http://127.0.0.1:{up_port}/health")
        for r in range(a.rounds):
            for mode in MODES:
                res = run_one(mode, up_port, tmp, a)
                results[mode].append(res)
                print(f"round {r + 1} {mode}: {res}", flush=True)
    finally:
        up.stop()
    print(f"\n{a.rounds} rounds x {a.requests} non-streamed requests at concurrency "
          f"{a.concurrency}; kill -9 after {a.kill_after} answers; {platform.machine()} "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{'ledger':<20} {'req/s':>8} {'vs memory':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'answered':>9} {'lost':>5}")
    base_rps = statistics.median(x["rps"] for x in results["memory"])
    for mode, rs in results.items():
        rps = statistics.median(x["rps"] for x in rs)
        p50 = statistics.median(x["p50"] for x in rs)
        p99 = statistics.median(x["p99"] for x in rs)
        ans = sum(int(x.get("answered", 0)) for x in rs)
        lost = sum(int(x.get("lost", 0)) for x in rs)
        kill = f"{ans:>9} {lost:>5}" if MODES[mode] is not None else f"{'-':>9} {'-':>5}"
        print(f"{mode:<20} {rps:>8.0f} {rps / base_rps:>10.2f} {p50:>8.1f} {p99:>8.1f} {kill}")


if __name__ == "__main__":
    main()
