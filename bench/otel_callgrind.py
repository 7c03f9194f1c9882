"""bench/otel_callgrind: OpenTelemetry's cost per request in instructions (valgrind's callgrind),
telemetry on against off, counted the same way on a busy machine as on a quiet one.

`bench/otel.py` reads CPU time from ``/proc``: on a shared 2-vCPU machine its rounds spread by
±10 % and the kernel counts in 10 ms ticks. This runs the same set-up (a fast fake upstream, an
OTLP/HTTP receiver, one gateway per variant, differing only in ``telemetry:``) with every gateway
under ``valgrind --tool=callgrind --trace-children=yes`` (so its exporter process too), with
instrumentation off until the measurement: after a warm-up, for each variant in turn it switches
counting on in the gateway and its exporter process (``callgrind_control -i on``), sends the
requests (half streamed), waits ``--tail`` seconds (the batcher's hand-over, the exporter's
encoding and sending, a metrics export), dumps the counts and switches counting off again; then it
counts the same processes idle for as long (no requests: timers, wake-ups, metric exports).
Instructions are not time (a cache miss costs more than an add), but they do not depend on the
machine's load; the ratio against off is the cost of the feature. Timers run on wall time and a
gateway under callgrind runs ~50x slower, so the batcher's 5 s wake-ups and metric exports are
counted as often as they come in that wall time: far more per request than at full speed. So the
table gives both: all instructions per request, and per request less the idle count (the marginal
cost of a request), with the idle cost per second apart. Scrapes are off (``scrape_interval_s``
3600) so that they do not do the same for every variant, and so are first-byte timeouts (a gateway
this slow would time its upstream out).

    python bench/otel_callgrind.py [--requests 300] [--ratios 1,0.05] [--variant off2=...]
                                   [--code NAME=DIR] [--cache-sim]

``--cache-sim`` adds callgrind's cache and branch-predictor simulation (``--cache-sim=yes
--branch-sim=yes``: first-level and last-level caches shaped like this machine's, as valgrind
reads them, and a simple predictor) and a second table: the gateway's simulated data-cache misses
and mispredicted branches per request, less idle. A simulation, not the
hardware's counters (``perf stat`` reads "not supported" for cycles and cache misses on this
VM): where the feature's instructions cost more time than their count says, it says whether
they miss the caches more than the gateway's other instructions do.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bench.otel import (  # noqa: E402
    burst,
    child_pids,
    code_trees,
    fleet,
    process_cpu,
    telemetry_variants,
)
from tests.support.otlp_receiver import OtlpReceiver  # noqa: E402
from tests.support.procs import Proc, env, free_port  # noqa: E402


class Callgrind(Proc):
    """A Python process under callgrind, instrumentation off until `counting` turns it on."""

    def __init__(self, args: list[str], log: Path, out: Path, src: Path | None = None,
                 cache_sim: bool = False) -> None:
        self.log = log
        self.out = out
        self._fh = log.open("wb")
        self.p = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--trace-children=yes", "--instr-atstart=no",
             *(["--cache-sim=yes", "--branch-sim=yes"] if cache_sim else []),
             f"--callgrind-out-file={out}.%p", sys.executable, *args],
            stdout=self._fh, stderr=subprocess.STDOUT, env=env(src), cwd=ROOT,
            start_new_session=True,
        )


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True,
                   timeout=120)


def totals(out: Path, pid: int) -> dict[str, int]:
    """Every event's total in the newest dump of process ``pid``: ``Ir`` (instructions), and
    with ``--cache-sim=yes`` also ``D1mr``, ``DLmr`` … (callgrind's event names)."""
    dumps = sorted(out.parent.glob(f"{out.name}.{pid}.*"), key=lambda p: int(p.suffix[1:]))
    names: list[str] = []
    for line in dumps[-1].read_text().splitlines():
        if line.startswith("events:"):
            names = line.split()[1:]
        elif line.startswith(("totals:", "summary:")) and names:
            return dict(zip(names, map(int, line.split()[1:]), strict=False))
    raise RuntimeError(f"no events and totals in {dumps[-1]}")


def misses(ev: dict[str, int]) -> tuple[int, int, int]:
    """(first-level, last-level) data-cache misses, reads and writes, and mispredicted
    branches (conditional and indirect)."""
    return (ev.get("D1mr", 0) + ev.get("D1mw", 0), ev.get("DLmr", 0) + ev.get("DLmw", 0),
            ev.get("Bcm", 0) + ev.get("Bim", 0))


async def measure(url: str, gw: Callgrind, n: int, conc: int,
                  tail_s: float) -> tuple[int, int, float, dict[str, int]]:
    """(gateway instructions, its child processes' instructions, wall seconds, the gateway's
    events) for ``n`` requests and ``tail_s`` after them; ``n`` 0: the same processes idle for
    ``tail_s``."""
    pids = [gw.p.pid, *child_pids(gw.p.pid)]
    for pid in pids:
        control(pid, "-z")
        control(pid, "-i", "on")
    t0 = time.monotonic()
    if n:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            await burst(s, url, n, conc)
    await asyncio.sleep(tail_s)
    wall = time.monotonic() - t0
    counts = []
    for pid in pids:
        control(pid, "-d")
        control(pid, "-i", "off")
        counts.append(totals(gw.out, pid))
    return counts[0]["Ir"], sum(c["Ir"] for c in counts[1:]), wall, counts[0]


def settle(pids: list[int], window_s: float = 3.0, busy_s: float = 0.15,
           limit_s: float = 300.0) -> None:
    """Wait until the gateways' child processes (the exporter processes, started by the
    warm-up, under callgrind too) are done starting: each used less than ``busy_s`` of CPU in
    the last ``window_s``. A start-up still running when the first variants are counted
    slows them (the same two CPUs): more wall time, so more of the idle timers' work per
    request. At least 10 s."""
    t0 = time.monotonic()
    time.sleep(10)
    before: dict[int, float] = {}
    while time.monotonic() - t0 < limit_s:
        now = {c: process_cpu(c) for p in pids for c in child_pids(p)}
        if before and all(now[c] - before.get(c, 0.0) < busy_s for c in now):
            break
        before = now
        time.sleep(window_s)
    print(f"exporter processes settled after {time.monotonic() - t0:.0f} s", file=sys.stderr)


async def warm(urls: dict[str, str], conc: int) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        for url in urls.values():
            await burst(s, url, 40, conc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=300, help="requests per variant")
    ap.add_argument("--ratios", default="1,0.05", help="sampling ratios of the on variants")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tail", type=float, default=15.0,
                    help="seconds counted after the last request (hand-over, export)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FIELDS",
                    help="another variant, as bench/otel.py's --variant")
    ap.add_argument("--code", action="append", default=[], metavar="NAME=DIR",
                    help="run variant NAME from the checkout DIR, as bench/otel.py's --code")
    ap.add_argument("--cache-sim", action="store_true",
                    help="simulate the caches too; print the gateway's data-cache misses")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ip-otel-cg-"))
    receiver = OtlpReceiver().start()
    up_port = free_port()
    telemetry = telemetry_variants(args.ratios, args.variant, receiver.endpoint)
    code = code_trees(args.code, telemetry)
    ports = {name: free_port() for name in telemetry}
    procs: list[Proc] = [Proc(["-m", "tests.support.fake_upstream", "--port", str(up_port),
                               "--mode", "fast"], tmp / "up.log")]
    load_before = os.getloadavg()
    counts: dict[str, tuple[int, int, int, int, float]] = {}
    #: the gateway's (first-level, last-level) data-cache misses, mispredicts: busy, idle
    cache: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {}
    try:
        procs[0].wait_http(f"http://127.0.0.1:{up_port}/health")
        gws: dict[str, Callgrind] = {}
        for name, port in ports.items():
            cfg = tmp / f"{name}.yaml"
            cfg.write_text(fleet(port, up_port, telemetry[name], 3600, {
                "connect_timeout_s": 60, "first_byte_timeout": {"enabled": False}}))
            gws[name] = Callgrind(["-m", "inferplane.cli", "serve", "--config", str(cfg),
                                   "--log-level", "warning"], tmp / f"gw-{name}.log",
                                  tmp / f"cg-{name}", code.get(name), args.cache_sim)
            procs.append(gws[name])
        for name, port in ports.items():
            gws[name].wait_http(f"http://127.0.0.1:{port}/ready", timeout=600)
        urls = {n: f"http://127.0.0.1:{p}/v1/chat/completions" for n, p in ports.items()}
        asyncio.run(warm(urls, args.concurrency))
        settle([gw.p.pid for gw in gws.values()])
        for name, url in urls.items():
            g, c, wall, ev = asyncio.run(measure(url, gws[name], args.requests,
                                                 args.concurrency, args.tail))
            ig, ic, _, iev = asyncio.run(measure(url, gws[name], 0, 0, wall))
            counts[name] = (g, c, ig, ic, wall)
            cache[name] = (misses(ev), misses(iev))
            print(f"{name}: {g / args.requests:,.0f} instructions/request, exporter "
                  f"{c / args.requests:,.0f}; idle over the same {wall:.0f} s: "
                  f"{ig / args.requests:,.0f} and {ic / args.requests:,.0f}", file=sys.stderr)
    finally:
        for p in reversed(procs):
            p.stop()
        receiver.stop()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    print(f"# bench/otel_callgrind — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC — git {git} — "
          f"{platform.node()}, Python {platform.python_version()} — {args.requests} requests per "
          f"variant (half streamed), concurrency {args.concurrency}, {args.tail:g} s counted "
          f"after them — load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} "
          "after")
    n = args.requests
    print("| variant | gateway instr./request | exporter process | gateway idle, same wall time "
          "| exporter idle | gateway vs off | gateway + exporter vs off | per request less idle: "
          "gateway vs off | gateway + exporter vs off | idle vs off, instr./s |")
    print("|---" * 10 + "|")
    g0, _, i0, _, w0 = counts["off"]
    for name, (g, c, ig, ic, wall) in counts.items():
        print(f"| {name} | {g / n:,.0f} | {c / n:,.0f} | {ig / n:,.0f} | {ic / n:,.0f} | "
              f"{g / g0:.3f}x | {(g + c) / g0:.3f}x | {(g - ig) / (g0 - i0):.3f}x | "
              f"{(g + c - ig - ic) / (g0 - i0):.3f}x | {(ig + ic) / wall - i0 / w0:+,.0f} |")
    if args.cache_sim:
        print()
        print("| variant | gateway D1 misses/request, less idle | LL misses/request, less idle "
              "| D1 misses per 1,000 instr. | LL misses per 1,000 instr. | D1 misses vs off "
              "| LL misses vs off | mispredicted branches/request, less idle | vs off |")
        print("|---" * 9 + "|")
        (d0, l0, b0), (id0, il0, ib0) = cache["off"]
        for name, ((d, ll, b), (idd, ill, ib)) in cache.items():
            g, _, ig, _, _ = counts[name]
            instr = max(g - ig, 1)
            print(f"| {name} | {(d - idd) / n:,.1f} | {(ll - ill) / n:,.1f} | "
                  f"{1000 * (d - idd) / instr:.2f} | {1000 * (ll - ill) / instr:.3f} | "
                  f"{(d - idd) / max(d0 - id0, 1):.3f}x | {(ll - ill) / max(l0 - il0, 1):.3f}x | "
                  f"{(b - ib) / n:,.1f} | {(b - ib) / max(b0 - ib0, 1):.3f}x |")
    print(f"spans received by the OTLP receiver: {len(receiver.spans())}")


if __name__ == "__main__":
    main()
