"""bench/fleet_scale: a request's round trip and the gateway's own CPU per request at 4 and at
2,000 endpoints, for two checkouts side by side (the one this file is in, and ``--other``).

    python bench/fleet_scale.py [--endpoints 4,2000] [--requests 300] [--rounds 3]
                                [--concurrency 1,8,32] [--scraped [--scrape-interval 5]]
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

``--concurrency 1,8,32``: each gateway run is measured at each of these (after one warm-up; in
that order in the first round, the order turned by one level each further round, so that no
level always meets the youngest or the oldest gateway): ``C`` clients on ``C`` keep-alive
connections, each sending its next request as its last answer arrives, until ``--requests``
have been sent; the same round trips and CPU ÷ requests.

After the warm-up the gateway is left without requests for 5 s and its CPU per second then is
printed apart (``idle CPU ms/s``: scrapes, health probes, the outlier sweep), with the CPU per
request less that rate over the level's time (``less idle``): with scraped endpoints the
background is a large part of the CPU per request, and its share falls as requests per second
rise, so a checkout that answers faster would look cheaper on work it did not change. The fake
upstream's CPU per request is printed too (it shares the machine).

``--scraped``: every endpoint's engine page is scraped (``scrape_metrics: true``), as for
self-hosted engines: the fake upstream answers ``/metrics`` with a small vLLM page (running 1,
waiting 0), every endpoint scraped every ``--scrape-interval`` seconds (default 5: 400 scrapes
a second at 2,000 endpoints; no pacing, no quiet back-off, the whole page: ``scrape_max_duty``
and ``scrape_quiet_interval_s`` null, ``scrape_filter`` false) and ``stale_after_s`` three
intervals. The same one fake upstream process answers every endpoint's scrapes (at its own
127.0.x.y address).
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
from collections.abc import Awaitable, Callable
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
IDLE_S = 5.0  # seconds without requests over which the gateway's background CPU is read


def fleet_yaml(n: int, up_port: int, gw_port: int, ledger: Path,
               scrape_s: float | None = None) -> str:
    """``n`` endpoints at 127.0.x.y:``up_port`` in substrates of `POOL`; scraped every
    ``scrape_s`` seconds, or not at all (None)."""
    eps = [endpoint(f"ep-{i}", url=f"http://127.0.{1 + i // 250}.{1 + i % 250}:{up_port}",
                    scrape_metrics=scrape_s is not None, max_concurrency=64) for i in range(n)]
    scrape: dict[str, Any] = {} if scrape_s is None else {
        "scrape_interval_s": scrape_s, "stale_after_s": 3 * scrape_s, "scrape_max_duty": None,
        "scrape_quiet_interval_s": None, "scrape_filter": False}
    cfg = pool_fleet(
        endpoints=eps, substrate={"cost": {"hourly_usd": 3.0}},
        gateway={"port": gw_port, "health_interval_s": 30, "token_estimate": "words",
                 "ledger_path": str(ledger), **scrape},
        tenants=[tenant("bench", KEY, default_class="bench")],
        classes=[{"name": "bench", "profile": "default"}])
    sub = {k: v for k, v in cfg["substrates"][0].items() if k != "endpoints"}
    cfg["substrates"] = [{**sub, "name": f"pool-{p}", "endpoints": eps[i:i + POOL]}
                         for p, i in enumerate(range(0, n, POOL))]
    return to_yaml(cfg)


async def measure(
    url: str, n: int, pid: int, levels: list[int], up_pid: int
) -> dict[int, dict[str, float]]:
    """Round trips and the gateway's CPU ÷ requests at each concurrency in ``levels`` (in that
    order), its CPU per second without requests, and the upstream's (``up_pid``) CPU ÷
    requests."""
    conn = aiohttp.TCPConnector(limit=max(levels))
    headers = {"Authorization": f"Bearer {KEY}"}
    out: dict[int, dict[str, float]] = {}
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
        idle0, t0 = cpu_seconds(pid), time.perf_counter()
        await asyncio.sleep(IDLE_S)
        idle = (cpu_seconds(pid) - idle0) / (time.perf_counter() - t0)  # CPU s per s
        for c in levels:
            lat: list[float] = []
            left = [n]
            cpu0, up0 = cpu_seconds(pid), cpu_seconds(up_pid)
            t0 = time.perf_counter()
            await asyncio.gather(*(client(one, left, lat) for _ in range(c)))
            wall = time.perf_counter() - t0
            cpu, up = cpu_seconds(pid) - cpu0, cpu_seconds(up_pid) - up0
            out[c] = {"p50_ms": pct(lat, 50) * 1e3, "p90_ms": pct(lat, 90) * 1e3,
                      "mean_ms": statistics.fmean(lat) * 1e3,
                      "cpu_ms_per_request": cpu / n * 1e3,
                      "idle_cpu_ms_per_s": idle * 1e3,
                      "cpu_less_idle_ms_per_request": (cpu - idle * wall) / n * 1e3,
                      "upstream_cpu_ms_per_request": up / n * 1e3,
                      "requests_per_s": n / wall}
    return out


async def client(one: Callable[[], Awaitable[float]], left: list[int], lat: list[float]) -> None:
    """One client: its next request as its last answer arrives, while ``left[0]`` > 0."""
    while left[0] > 0:
        left[0] -= 1
        lat.append(await one())


def ratio(a: float, b: float) -> str:
    """``a ÷ b`` as ``x1.23``; a dash where ``b`` is 0 (no idle CPU read over 5 s, say)."""
    return f"x{a / b:.2f}" if b else "—"


def one_run(tree: Path, n: int, up_port: int, requests: int, work: Path, levels: list[int],
            scrape_s: float | None, up_pid: int) -> dict[int, dict[str, float]]:
    gw_port = free_port()
    tag = f"{tree.name}-{n}-{gw_port}"
    cfg = work / f"{tag}.yaml"
    cfg.write_text(fleet_yaml(n, up_port, gw_port, work / f"{tag}.sqlite3", scrape_s))
    gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg), "--log-level", "error"],
              work / f"{tag}.log", src=tree / "src")
    try:
        gw.wait_http(f"http://127.0.0.1:{gw_port}/ready", timeout=120)
        time.sleep(5)  # every endpoint's first health probe answered
        return asyncio.run(measure(f"http://127.0.0.1:{gw_port}/v1/chat/completions",
                                   requests, gw.p.pid, levels, up_pid))
    finally:
        gw.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--endpoints", default="4,2000")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="1", help="requests in flight, e.g. 1,8,32")
    ap.add_argument("--scraped", action="store_true", help="scrape every endpoint's page")
    ap.add_argument("--scrape-interval", type=float, default=5.0)
    ap.add_argument("--other", help="NAME=CHECKOUT: the checkout to compare with")
    ap.add_argument("--name", default="this", help="this checkout's name in the table")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    trees = {args.name: ROOT}
    if args.other:
        name, _, path = args.other.partition("=")
        trees[name] = Path(path).resolve()
    sizes = [int(x) for x in args.endpoints.split(",")]
    levels = [int(x) for x in args.concurrency.split(",")]
    scrape_s = args.scrape_interval if args.scraped else None
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
    rows: dict[tuple[str, int, int], list[dict[str, float]]] = {}
    try:
        up.wait_http(f"http://127.0.0.1:{up_port}/health")
        for r in range(args.rounds):
            order = list(trees.items()) if r % 2 == 0 else list(reversed(trees.items()))
            k = r % len(levels)
            turned = levels[k:] + levels[:k]  # each round starts one level further on
            for n in sizes:
                for name, tree in order:
                    res = one_run(tree, n, up_port, args.requests, work, turned, scrape_s,
                                  up.p.pid)
                    for c, m in res.items():
                        rows.setdefault((name, n, c), []).append(m)
                        print(f"round {r + 1} {name} {n} c{c}: {m}", file=sys.stderr, flush=True)
    finally:
        up.stop()
    keys = ["p50_ms", "p90_ms", "mean_ms", "cpu_ms_per_request", "requests_per_s",
            "idle_cpu_ms_per_s", "cpu_less_idle_ms_per_request", "upstream_cpu_ms_per_request"]
    med = {k: {m: statistics.median(x[m] for x in v) for m in keys} for k, v in rows.items()}
    mode = f"scraped every {scrape_s:g} s" if scrape_s is not None else "not scraped"
    print(f"# bench/fleet_scale — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC — {platform.node()} "
          f"— Python {platform.python_version()} — {args.requests} requests at concurrency "
          f"{args.concurrency} x {args.rounds} rounds (medians of the rounds) — endpoints "
          f"{mode}")
    print("| endpoints | in flight | checkout | p50 ms | p90 ms | mean ms "
          "| gateway CPU ms/request | requests/s | gateway idle CPU ms/s "
          "| CPU ms/request less idle | upstream CPU ms/request |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        for c in levels:
            for name in trees:
                m = med[(name, n, c)]
                print(f"| {n} | {c} | {name} | {m['p50_ms']:.2f} | {m['p90_ms']:.2f} "
                      f"| {m['mean_ms']:.2f} | {m['cpu_ms_per_request']:.2f} "
                      f"| {m['requests_per_s']:.0f} | {m['idle_cpu_ms_per_s']:.0f} "
                      f"| {m['cpu_less_idle_ms_per_request']:.2f} "
                      f"| {m['upstream_cpu_ms_per_request']:.2f} |")
    if len(trees) == 2:
        a, b = list(trees)
        print(f"\n| endpoints | in flight | {a} ÷ {b}: p50 | p90 | mean | CPU/request "
              "| requests/s | idle CPU/s | CPU/request less idle | upstream CPU/request |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for n in sizes:
            for c in levels:
                print(f"| {n} | {c} | " + " | ".join(
                    ratio(med[(a, n, c)][k], med[(b, n, c)][k]) for k in keys) + " |")
        for name in trees:
            if sizes == [4, 2000]:
                for c in levels:
                    print(f"\n{name}, {c} in flight: 2,000 ÷ 4 endpoints: " + ", ".join(
                        f"{k} {ratio(med[(name, 2000, c)][k], med[(name, 4, c)][k])}"
                        for k in keys))
    if args.json:
        out: dict[str, Any] = {"args": vars(args) | {"json": str(args.json)},
                               "rounds": {f"{k[0]}/{k[1]}/c{k[2]}": v
                                          for k, v in rows.items()},
                               "medians": {f"{k[0]}/{k[1]}/c{k[2]}": v
                                           for k, v in med.items()}}
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
