"""bench/overhead: the gateway's added latency over calling the upstream directly.

Starts a fast fake upstream and an inferplane gateway (round-robin profile, one endpoint) as real
processes on loopback, then measures, in the same run and interleaved, requests sent directly to
the upstream and through the gateway: sequential and at concurrency 32, streaming and not.
Added latency = percentile(via gateway) − percentile(direct). Prints a markdown table.

    python bench/overhead.py [--requests 2000] [--concurrency 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from inferplane.api.pipeline import hash_key  # noqa: E402
from tests.support.procs import Proc, free_port  # noqa: E402

KEY = "sk-bench"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hello " * 20}], "max_tokens": 5}


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


async def one(session: aiohttp.ClientSession, url: str, stream: bool) -> float:
    body = dict(BODY, stream=stream)
    t0 = time.perf_counter()
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {await r.text()}")
        await r.read()
    return time.perf_counter() - t0


async def run_mode(
    session: aiohttp.ClientSession, urls: dict[str, str], n: int, conc: int, stream: bool
) -> dict[str, list[float]]:
    """Interleave direct and gateway requests so both see the same machine noise."""
    out: dict[str, list[float]] = {k: [] for k in urls}
    for _ in range(50):  # warm-up: open keep-alive connections on both paths
        for u in urls.values():
            await one(session, u, stream)
    if conc == 1:
        for _ in range(n):
            for k, u in urls.items():
                out[k].append(await one(session, u, stream))
        return out
    for k, u in urls.items():
        sem = asyncio.Semaphore(conc)
        await asyncio.gather(*(_limited(sem, session, u, stream, out[k]) for _ in range(n)))
    return out


async def _limited(sem: asyncio.Semaphore, session: aiohttp.ClientSession, url: str,
                   stream: bool, into: list[float]) -> None:
    async with sem:
        into.append(await one(session, url, stream))


async def main_async(args: argparse.Namespace, urls: dict[str, str]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        for conc in (1, args.concurrency):
            for stream in (False, True):
                # alternate the order of the two paths between repeats for the concurrent case
                res = await run_mode(session, urls, args.requests, conc, stream)
                d, g = res["direct"], res["gateway"]
                rows.append({
                    "concurrency": conc, "stream": stream, "n": len(g),
                    "direct_p50_ms": pct(d, 50) * 1e3, "direct_p99_ms": pct(d, 99) * 1e3,
                    "gateway_p50_ms": pct(g, 50) * 1e3, "gateway_p99_ms": pct(g, 99) * 1e3,
                    "added_p50_ms": (pct(g, 50) - pct(d, 50)) * 1e3,
                    "added_p99_ms": (pct(g, 99) - pct(d, 99)) * 1e3,
                    "added_mean_ms": (statistics.fmean(g) - statistics.fmean(d)) * 1e3,
                })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ip-overhead-"))
    up_port, gw_port = free_port(), free_port()
    cfg = tmp / "fleet.yaml"
    cfg.write_text(f"""
gateway: {{port: {gw_port}, scrape_interval_s: 0.1}}
substrates:
  - name: pool
    kind: gpu
    hardware: h100
    region: r1
    jurisdiction: eu
    cost: {{hourly_usd: 3.0}}
    endpoints:
      - name: up
        url: "http://127.0.0.1:{up_port}"
        models: [{{name: m, profile: llama-3.1-8b, max_context: 8192}}]
tenants:
  - {{name: bench, api_keys: ["{hash_key(KEY)}"], default_class: bench}}
classes:
  - {{name: bench, profile: round-robin}}
""")
    up = Proc(["-m", "tests.support.fake_upstream", "--port", str(up_port), "--mode", "fast"],
              tmp / "up.log")
    gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg), "--log-level", "warning"],
              tmp / "gw.log")
    try:
        up.wait_http(f"http://127.0.0.1:{up_port}/health")
        gw.wait_http(f"http://127.0.0.1:{gw_port}/ready")
        urls = {"direct": f"http://127.0.0.1:{up_port}/v1/chat/completions",
                "gateway": f"http://127.0.0.1:{gw_port}/v1/chat/completions"}
        rows = asyncio.run(main_async(args, urls))
    finally:
        gw.stop()
        up.stop()
    print(f"# bench/overhead — {date.today()} — {platform.node()} "
          f"({platform.processor() or platform.machine()}), Python {platform.python_version()}")
    print("| concurrency | stream | n | direct p50 ms | gateway p50 ms | added p50 ms | "
          "direct p99 ms | gateway p99 ms | added p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['stream']} | {r['n']} | {r['direct_p50_ms']:.3f} | "
              f"{r['gateway_p50_ms']:.3f} | **{r['added_p50_ms']:.3f}** | "
              f"{r['direct_p99_ms']:.3f} | {r['gateway_p99_ms']:.3f} | "
              f"**{r['added_p99_ms']:.3f}** |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
