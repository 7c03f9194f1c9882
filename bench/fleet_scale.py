"""bench/fleet_scale: a request's round trip and the gateway's own CPU per request at 4 and at
2,000 endpoints, for two checkouts side by side (the one this file is in, and ``--other``).

    python bench/fleet_scale.py [--endpoints 4,2000] [--requests 300] [--rounds 3]
                                [--other main=/path/to/checkout] [--json out.json]

The fleet is audit28's: ``N`` endpoints of one model in pools of 100 (20 pools at 2,000), the
``default`` placement profile, ``scrape_metrics: false`` and ``health_interval_s: 30`` (no
engine page to scrape, health probed every 30 s), the SQLite ledger (``gateway.ledger_path``),
and one fake upstream (`tests.support.fake_upstream`, mode ``fast``) on 0.0.0.0 that every
endpoint reaches at its own loopback address (``127.0.x.y``). For each round, each fleet size
and each checkout (alternating, so both see the same machine), a gateway of that checkout is
started alone, waits for ``/ready`` and 5 s more (time for every endpoint's first health probe
to answer; the usable count is not checked: with the fast fake upstream it is), gets 30 warm-up
requests, then ``--requests`` sequential non-streamed chat requests over one keep-alive
connection; measured: the client's round trip (p50, p90, mean) and the gateway process's user +
system CPU over those requests ÷ their number (``/proc/PID/stat``; its background work — health
probes, the outlier sweep — included, as a request pays for it). Prints one table with each
row's median over the rounds and the ratio this checkout ÷ the other; ``--json`` keeps every
round.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bench.overhead import cpu_seconds, pct  # noqa: E402
from tests.builders import endpoint, pool_fleet, tenant, to_yaml  # noqa: E402
from tests.support.procs import Proc, free_port  # noqa: E402

KEY = "sk-bench"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hello " * 20}], "max_tokens": 5}
POOL = 100  # endpoints per substrate


def fleet_yaml(n: int, up_port: int, gw_port: int, ledger: Path) -> str:
    """``n`` endpoints at 127.0.x.y:``up_port`` in substrates of `POOL`."""
    eps = [endpoint(f"ep-{i}", url=f"http://127.0.{1 + i // 250}.{1 + i % 250}:{up_port}",
                    scrape_metrics=False, max_concurrency=64) for i in range(n)]
    cfg = pool_fleet(
        endpoints=eps, substrate={"cost": {"hourly_usd": 3.0}},
        gateway={"port": gw_port, "health_interval_s": 30, "token_estimate": "words",
                 "ledger_path": str(ledger)},
        tenants=[tenant("bench", KEY, default_class="bench")],
        classes=[{"name": "bench", "profile": "default"}])
    sub = {k: v for k, v in cfg["substrates"][0].items() if k != "endpoints"}
    cfg["substrates"] = [{**sub, "name": f"pool-{p}", "endpoints": eps[i:i + POOL]}
                         for p, i in enumerate(range(0, n, POOL))]
    return to_yaml(cfg)


async def measure(url: str, n: int, pid: int) -> dict[str, float]:
    conn = aiohttp.TCPConnector(limit=1)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(connector=conn) as s:
        async def one() -> float:
            t0 = time.perf_counter()
            async with s.post(url, json=BODY, headers=headers) as r:
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
                await r.read()
            return time.perf_counter() - t0

        for _ in range(30):
            await one()
        cpu0 = cpu_seconds(pid)
        lat = [await one() for _ in range(n)]
        cpu = cpu_seconds(pid) - cpu0
    return {"p50_ms": pct(lat, 50) * 1e3, "p90_ms": pct(lat, 90) * 1e3,
            "mean_ms": statistics.fmean(lat) * 1e3, "cpu_ms_per_request": cpu / n * 1e3}


def one_run(tree: Path, n: int, up_port: int, requests: int, work: Path) -> dict[str, float]:
    gw_port = free_port()
    tag = f"{tree.name}-{n}-{gw_port}"
    cfg = work / f"{tag}.yaml"
    cfg.write_text(fleet_yaml(n, up_port, gw_port, work / f"{tag}.sqlite3"))
    gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg), "--log-level", "error"],
              work / f"{tag}.log", src=tree / "src")
    try:
        gw.wait_http(f"http://127.0.0.1:{gw_port}/ready", timeout=120)
        time.sleep(5)  # every endpoint's first health probe answered
        return asyncio.run(measure(f"http://127.0.0.1:{gw_port}/v1/chat/completions",
                                   requests, gw.p.pid))
    finally:
        gw.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--endpoints", default="4,2000")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--other", help="NAME=CHECKOUT: the checkout to compare with")
    ap.add_argument("--name", default="this", help="this checkout's name in the table")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    trees = {args.name: ROOT}
    if args.other:
        name, _, path = args.other.partition("=")
        trees[name] = Path(path).resolve()
    sizes = [int(x) for x in args.endpoints.split(",")]
    work = Path(tempfile.mkdtemp(prefix="ip-fleet-scale-"))
    up_port = free_port()
    # on 0.0.0.0, not 127.0.0.1: each endpoint reaches it at its own 127.0.x.y (one listener
    # for them all; loopback-only machines still keep it off the network)
    up = Proc(["-c", "import asyncio, sys; from aiohttp import web; "
               "from tests.support.fake_upstream import build\n"
               "async def main():\n"
               "    r = web.AppRunner(build('up', 'fast', 0.0)); await r.setup()\n"
               f"    await web.TCPSite(r, '0.0.0.0', {up_port}).start()\n"
               "    await asyncio.Event().wait()\n"
               "asyncio.run(main())"], work / "up.log")
    rows: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        up.wait_http(f"http://127.0.0.1:{up_port}/health")
        for r in range(args.rounds):
            order = list(trees.items()) if r % 2 == 0 else list(reversed(trees.items()))
            for n in sizes:
                for name, tree in order:
                    res = one_run(tree, n, up_port, args.requests, work)
                    rows.setdefault((name, n), []).append(res)
                    print(f"round {r + 1} {name} {n}: {res}", file=sys.stderr, flush=True)
    finally:
        up.stop()
    keys = ["p50_ms", "p90_ms", "mean_ms", "cpu_ms_per_request"]
    med = {k: {m: statistics.median(x[m] for x in v) for m in keys} for k, v in rows.items()}
    print(f"# bench/fleet_scale — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC — {platform.node()} "
          f"— Python {platform.python_version()} — {args.requests} sequential requests x "
          f"{args.rounds} rounds (medians of the rounds)")
    print("| endpoints | checkout | p50 ms | p90 ms | mean ms | gateway CPU ms/request |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        for name in trees:
            m = med[(name, n)]
            print(f"| {n} | {name} | {m['p50_ms']:.2f} | {m['p90_ms']:.2f} | {m['mean_ms']:.2f} "
                  f"| {m['cpu_ms_per_request']:.2f} |")
    if len(trees) == 2:
        a, b = list(trees)
        print(f"\n| endpoints | {a} ÷ {b}: p50 | p90 | mean | CPU/request |")
        print("|---|---|---|---|---|")
        for n in sizes:
            print(f"| {n} | " + " | ".join(
                f"x{med[(a, n)][k] / med[(b, n)][k]:.2f}" for k in keys) + " |")
        for name in trees:
            if sizes == [4, 2000]:
                print(f"\n{name}: 2,000 ÷ 4 endpoints: " + ", ".join(
                    f"{k} x{med[(name, 2000)][k] / med[(name, 4)][k]:.2f}" for k in keys))
    if args.json:
        out: dict[str, Any] = {"args": vars(args) | {"json": str(args.json)},
                               "rounds": {f"{k[0]}/{k[1]}": v for k, v in rows.items()},
                               "medians": {f"{k[0]}/{k[1]}": v for k, v in med.items()}}
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
