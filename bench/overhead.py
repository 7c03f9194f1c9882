"""bench/overhead: the gateway's added latency over calling the upstream directly.

Starts a fast fake upstream and an inferplane gateway (round-robin profile, one endpoint, unless
told otherwise) as real processes on loopback, then measures, in the same run and interleaved,
requests sent directly to the upstream and through the gateway: sequential and at concurrency 32,
streaming and not. Added latency = percentile(via gateway) − percentile(direct). Prints a
markdown table.

    python bench/overhead.py [--requests 2000] [--concurrency 32] [--profile default]
                             [--endpoints 4] [--modes seq] [--cprofile gw.prof] [--json out.json]

``--endpoints N`` serves N endpoints (one fake upstream process listening on N ports; the
direct path calls the first); ``--cprofile`` runs the gateway under cProfile and writes its
statistics when the gateway stops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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

from tests.builders import endpoint, pool_fleet, tenant, to_yaml  # noqa: E402
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main_async(args: argparse.Namespace, urls: dict[str, str],
                     gw_pid: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        concs = {"seq": 1, "c32": args.concurrency}
        for conc in [concs[m] for m in args.modes.split(",")]:
            for stream in (False, True):
                # alternate the order of the two paths between repeats for the concurrent case
                cpu0 = cpu_seconds(gw_pid)
                res = await run_mode(session, urls, args.requests, conc, stream)
                cpu = cpu_seconds(gw_pid) - cpu0
                d, g = res["direct"], res["gateway"]
                rows.append({
                    "concurrency": conc, "stream": stream, "n": len(g),
                    "direct_p50_ms": pct(d, 50) * 1e3, "direct_p99_ms": pct(d, 99) * 1e3,
                    "gateway_p50_ms": pct(g, 50) * 1e3, "gateway_p99_ms": pct(g, 99) * 1e3,
                    "added_p50_ms": (pct(g, 50) - pct(d, 50)) * 1e3,
                    "added_p99_ms": (pct(g, 99) - pct(d, 99)) * 1e3,
                    "added_mean_ms": (statistics.fmean(g) - statistics.fmean(d)) * 1e3,
                    # the gateway's CPU over the mode (its warm-up requests included)
                    "gateway_cpu_ms_per_request": cpu / (len(g) + 50) * 1e3,
                })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--profile", default="round-robin", help="the placement profile to use")
    ap.add_argument("--endpoints", type=int, default=1, help="endpoints in the fleet")
    ap.add_argument("--modes", default="seq,c32", help="comma list of seq, c32")
    ap.add_argument("--cprofile", type=Path, help="run the gateway under cProfile, stats here")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ip-overhead-"))
    up_ports, gw_port = [free_port() for _ in range(args.endpoints)], free_port()
    up_port = up_ports[0]
    cfg = tmp / "fleet.yaml"
    cfg.write_text(to_yaml(pool_fleet(
        endpoints=[endpoint(f"up{i}", port) for i, port in enumerate(up_ports)],
        substrate={"cost": {"hourly_usd": 3.0}},
        gateway={"port": gw_port, "scrape_interval_s": 0.1},
        tenants=[tenant("bench", KEY, default_class="bench")],
        classes=[{"name": "bench", "profile": args.profile}])))
    ports = [a for p in up_ports for a in ("--port", str(p))]
    up = Proc(["-m", "tests.support.fake_upstream", *ports, "--mode", "fast"], tmp / "up.log")
    prof = ["-m", "cProfile", "-o", str(args.cprofile)] if args.cprofile else []
    gw = Proc([*prof, "-m", "inferplane.cli", "serve", "--config", str(cfg),
               "--log-level", "warning"], tmp / "gw.log")
    try:
        up.wait_http(f"http://127.0.0.1:{up_port}/health")
        gw.wait_http(f"http://127.0.0.1:{gw_port}/ready")
        urls = {"direct": f"http://127.0.0.1:{up_port}/v1/chat/completions",
                "gateway": f"http://127.0.0.1:{gw_port}/v1/chat/completions"}
        rows = asyncio.run(main_async(args, urls, gw.p.pid))
    finally:
        gw.stop()
        up.stop()
    print(f"# bench/overhead — {date.today()} — {platform.node()} "
          f"({platform.processor() or platform.machine()}), Python {platform.python_version()} "
          f"— profile {args.profile}, {args.endpoints} endpoint(s)")
    print("| concurrency | stream | n | direct p50 ms | gateway p50 ms | added p50 ms | "
          "direct p99 ms | gateway p99 ms | added p99 ms | gateway CPU ms/request |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['stream']} | {r['n']} | {r['direct_p50_ms']:.3f} | "
              f"{r['gateway_p50_ms']:.3f} | **{r['added_p50_ms']:.3f}** | "
              f"{r['direct_p99_ms']:.3f} | {r['gateway_p99_ms']:.3f} | "
              f"**{r['added_p99_ms']:.3f}** | {r['gateway_cpu_ms_per_request']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
