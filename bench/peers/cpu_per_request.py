"""bench/peers/cpu_per_request.py: the CPU a router spends per request, against a bare relay.

    python bench/peers/cpu_per_request.py [--duration 120] [--reps 2] [--ttft-s 0.05]
                                          [--variant NAME=PATH:VALUE,...] [--tree NAME=PATH]
                                          [--pyspy NAME] [--out DIR]

Starts three stand-in engines (`fake_engine.py`: every request answered after ``--ttft-s``,
16 streamed tokens 2 ms apart) and replays the real-engine bench's slice of the Mooncake trace
(its text prompts and bursts, streamed completions) open-loop through each router in turn,
alternating the order between repetitions:

- ``proxy``: `python_proxy.py`, the least a Python asyncio relay does (round robin, no parsing);
- each inferplane variant: the gateway with the fleet file ``real_engines.py`` writes (KV
  events, the tiny model's tokenizer), changed at dotted keys as in ``gateway_gap.py``, run from
  this checkout or from ``--tree NAME=PATH`` (a checkout whose ``src`` it runs; its compiled
  build must be current there: ``scripts/compile_native.py``). A variant is ``TREE:NAME`` when
  trees are given.

Per router and repetition: the router's CPU time over the replay and over ``--idle-s`` seconds
before it (every thread's time on the CPU from ``/proc/PID/task/*/schedstat``, in nanoseconds,
where ``/proc/PID/stat`` counts 10 ms ticks), the CPU per answered request with the idle rate
taken off, the client's TTFT P50/P90 and, for a gateway, its stream coalescing holds
(``inferplane_stream_coalesce_holds_total``, read from its /metrics, open on its API listener
here, after the replay). The stand-ins' answers take no CPU worth counting, so
a router's CPU is what it spends relaying; the machine is otherwise as the queue leaves it.
``--pyspy NAME`` records that router's last repetition with py-spy (``--rate``, raw collapsed
stacks in ``--out``). Ratios to the proxy in the same run are what compare across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
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

from bench.peers import client, real_engines  # noqa: E402
from bench.peers.burst_transit import start_engines  # noqa: E402
from bench.peers.gateway_gap import (  # noqa: E402
    HEADERS,
    bench_slice,
    gateway_config,
    start_gateway,
)
from bench.peers.procs import cpu_ns, free_port, wait_up  # noqa: E402


def start_proxy(urls: list[str], work: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    with (work / "proxy.log").open("wb") as log:
        p = subprocess.Popen([sys.executable, str(ROOT / "bench/peers/python_proxy.py"),
                              "--port", str(port), *[x for u in urls for x in ("--upstream", u)]],
                             stdout=log, stderr=subprocess.STDOUT)
    wait_up(f"http://127.0.0.1:{port}", p, "python_proxy")
    return p, port


def stop(p: subprocess.Popen[bytes]) -> None:
    p.terminate()
    try:
        p.wait(15)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def has_public_metrics(tree: Path) -> bool:
    """Whether the checkout's config schema has ``gateway.metrics.public`` (since f97eec8): an
    older one rejects the key, so its gateways get no open /metrics and no holds column."""
    schema = tree / "src/inferplane/config/schema.py"
    return schema.is_file() and "    public: bool" in schema.read_text()


def coalesce_holds(port: int) -> float:
    """The gateway's ``inferplane_stream_coalesce_holds_total`` (``gateway.stream_coalesce_ms``)
    from its /metrics; NaN where it has none (a checkout before the counter) or /metrics is
    not open (a checkout before ``gateway.metrics.public``)."""
    with contextlib.suppress(httpx.HTTPError):
        for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
            if line.startswith("inferplane_stream_coalesce_holds_total "):
                return float(line.split()[1])
    return float("nan")


def median_or_dash(values: list[float], fmt: str) -> str:
    """The median of the values that are not NaN, formatted; "–" where there are none."""
    known = [v for v in values if not math.isnan(v)]
    return format(statistics.median(known), fmt) if known else "–"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=120.0, help="trace seconds")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--ttft-s", type=float, default=0.05)
    ap.add_argument("--idle-s", type=float, default=8.0)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=PATH:VALUE,...")
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--pyspy", help="record this router's last repetition with py-spy")
    ap.add_argument("--rate", type=int, default=500, help="py-spy samples a second")
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="ip-cpu-")))
    a = ap.parse_args(argv)
    variants = dict(v.split("=", 1) for v in (a.variant or ["default="]))
    trees = {k: Path(v).resolve() for k, v in (t.split("=", 1) for t in a.tree)} or {"": ROOT}
    routers = ["proxy", *(f"{t}:{v}" if t else v for t in trees for v in variants)]
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ip-cpu-work-"))
    planned, bodies = bench_slice(0.0, a.duration, 1.0)
    engines = start_engines(3, a.ttft_s, work)
    urls = [url for (url, _), _ in engines]
    print(f"{len(planned)} requests over {planned[-1].arrival_s:.0f} s; load "
          f"{os.getloadavg()[0]:.1f}; out {a.out}", flush=True)
    rows: dict[str, list[dict[str, float]]] = {r: [] for r in routers}
    try:
        for rep in range(a.reps):
            for name in routers if rep % 2 == 0 else routers[::-1]:
                public = False  # the holds are read from an open /metrics only
                if name == "proxy":
                    p, port = start_proxy(urls, work)
                else:
                    tree, _, var = name.rpartition(":")
                    port = free_port()
                    # /metrics open on the API listener: the holds are read after the replay
                    public = has_public_metrics(trees[tree])
                    sets = ",".join(filter(None, [
                        variants[var], "gateway.metrics.public:true" if public else ""]))
                    conf = gateway_config([e for e, _ in engines], port, sets, work,
                                          f"{tree or 'this'}-{var}")
                    p = start_gateway(conf, work / f"gateway-{name}-{rep}.log",
                                      tree=trees[tree])
                spy = None
                try:
                    time.sleep(2)
                    c0, t0 = cpu_ns(p.pid), time.monotonic()
                    time.sleep(a.idle_s)
                    idle = (cpu_ns(p.pid) - c0) / 1e9 / (time.monotonic() - t0)
                    if name == a.pyspy and rep == a.reps - 1:
                        spy = subprocess.Popen(
                            [str(Path(sys.executable).parent / "py-spy"), "record", "-p",
                             str(p.pid), "-r", str(a.rate), "-f", "raw", "--nonblocking",
                             "-o", str(a.out / f"{name.replace(':', '_')}.raw")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                        time.sleep(1)
                    c0, t0 = cpu_ns(p.pid), time.monotonic()
                    records, _ = asyncio.run(client.replay(
                        f"http://127.0.0.1:{port}", planned, bodies, "/v1/completions",
                        HEADERS, request_timeout_s=60, deadline_s=planned[-1].arrival_s + 30))
                    cpu, wall = (cpu_ns(p.pid) - c0) / 1e9, time.monotonic() - t0
                    holds = coalesce_holds(port) if public else float("nan")
                finally:
                    if spy is not None:
                        spy.send_signal(signal.SIGINT)
                        spy.wait(30)
                    stop(p)
                ok = [r for r in records if r.ok and r.ttft_s is not None]
                ttft = sorted(1e3 * r.ttft_s for r in ok if r.ttft_s is not None)
                row = {"ok": len(ok), "cpu_s": cpu, "idle_cpu_per_s": idle,
                       "ms_per_request": 1e3 * (cpu - idle * wall) / max(len(ok), 1),
                       "ttft_p50": ttft[len(ttft) // 2] if ttft else float("nan"),
                       "ttft_p90": ttft[int(0.9 * (len(ttft) - 1))] if ttft else float("nan"),
                       "holds": holds}
                rows[name].append(row)
                print(f"rep {rep} {name:16s} " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()),
                      flush=True)
    finally:
        for q in real_engines.PROCS:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(q.pid, signal.SIGTERM)
    proxy = statistics.median(r["ms_per_request"] for r in rows["proxy"])
    print("\n| router | CPU ms per request | × the proxy | raw CPU s | TTFT p50 | TTFT p90 | "
          "holds |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in rows.items():
        per = statistics.median(r["ms_per_request"] for r in rs)
        print(f"| {name} | {per:.3f} | {per / proxy:.2f} | "
              f"{statistics.median(r['cpu_s'] for r in rs):.3f} | "
              f"{statistics.median(r['ttft_p50'] for r in rs):.1f} | "
              f"{statistics.median(r['ttft_p90'] for r in rs):.1f} | "
              f"{median_or_dash([r['holds'] for r in rs], '.0f')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
