"""bench/peers/gateway_gap.py: where the gateway's time goes in front of one real vLLM engine.

    python bench/peers/gateway_gap.py [--start 0] [--duration 20] [--rate-scale 0.3333]
                                      [--reps 2] [--variant NAME=PATH:VALUE,...] ...

1. starts one vLLM CPU engine the way ``real_engines.py`` starts its three;
2. measures what one ``GET /metrics`` costs the engine's API server (CPU of that process, the
   page's size) and the gateway's parser;
3. replays the Mooncake slice (the bench's text prompts, one 512-token trace block = 32 words)
   open-loop **straight to the engine** and **through the gateway** in each variant, started
   one at a time (no gateway runs during the straight replay, so none scrapes the engine then),
   alternating the order between repetitions; per replay: TTFT p50/p90 at the client, CPU of
   the engine's API server and of the gateway;
4. measures each variant's idle gateway: CPU and context switches per second over 20 s.

Each replay also counts the TCP connections the engine accepted during it, from its access log
(uvicorn writes the peer's ``host:port`` on every request line): ``conns`` distinct peers in all,
``req_conns`` of them carrying a completion request, and the requests (``posts``) and other GETs
(scrapes, probes: ``gets``) they carried. And it differences the engine's own histograms over
the replay: its mean TTFT (``vllm:time_to_first_token_seconds``, from the arrival its front end
records to the first token), queue and prefill time, and its prefix-cache hit rate.

``--fake-ttft S`` puts `bench/peers/fake_engine.py` (a stand-in that answers every request after
S seconds, whatever the load) where the engine was: then every millisecond a path adds to the time
to first token is the router's own, and the engine-side columns are empty.

Each row also reads the trace's bursts: its requests come in bursts (all the requests of one
trace second at the same instant: 9-14 at a time in the default slice, and as many reach the one
gateway of ``real_engines.py``'s ×1 replay). ``burst_first_ms`` is the TTFT of a burst's first
request (median over the bursts of 4 or more), ``burst_ms_per_place`` the least-squares slope of
TTFT over a request's place in its burst (in send order; median over the bursts): what one
request ahead in the same burst costs the next.

A variant sets fleet-file fields of the gateway (dotted paths, YAML values), e.g.
``fixed=gateway.scrape_max_duty:null`` (a fixed 0.1 s scrape period) or
``slow-batch=batch.idle_poll_interval_s:0.05``. The gateway otherwise gets the fleet file
``real_engines.py`` writes (with ``kv_events`` and the model's tokenizer).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
for _p in (str(ROOT / "src"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench.peers import client, metrics, real_engines  # noqa: E402
from bench.peers.peers import INFERPLANE_KEY, inferplane_fleet  # noqa: E402
from bench.peers.procs import free_port, wait_up  # noqa: E402
from bench.peers.workload import SliceSpec, encode_bodies, plan  # noqa: E402
from inferplane.fleet.engine_metrics import parse_metrics  # noqa: E402
from inferplane.twin.traces.loader import load_trace  # noqa: E402

TRACE = Path("/work/shared/traces/mooncake_conversation.jsonl")
HEADERS = {"Authorization": f"Bearer {INFERPLANE_KEY}"}


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads, not its children)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def switches(pid: int) -> int:
    """Context switches (voluntary + involuntary) of every thread of ``pid``."""
    n = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        for line in Path(f"/proc/{pid}/task/{t}/status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                n += int(line.split()[1])
    return n


def metrics_cost(url: str, pid: int, n: int = 200) -> dict[str, float]:
    with httpx.Client() as c:
        page = c.get(f"{url}/metrics").text
        c0, t0 = proc_cpu_s(pid), time.perf_counter()
        for _ in range(n):
            c.get(f"{url}/metrics")
        cpu, wall = proc_cpu_s(pid) - c0, time.perf_counter() - t0
    p0 = time.process_time()
    for _ in range(n):
        parse_metrics("vllm", page)
    return {"page_bytes": len(page.encode()), "engine_cpu_ms_per_get": 1e3 * cpu / n,
            "wall_ms_per_get": 1e3 * wall / n,
            "gateway_parse_ms": 1e3 * (time.process_time() - p0) / n}


ACCESS = re.compile(r'(\d+\.\d+\.\d+\.\d+:\d+) - "(GET|POST) (\S+) HTTP')


def connections(log_text: str) -> dict[str, float]:
    """Connections and requests in a piece of the engine's uvicorn access log (one line per
    request, with the peer's ``host:port``: one distinct peer is one TCP connection)."""
    peers: dict[str, list[str]] = {}
    for m in ACCESS.finditer(log_text):
        peers.setdefault(m.group(1), []).append(m.group(2))
    return {"conns": float(len(peers)),
            "req_conns": float(sum("POST" in v for v in peers.values())),
            "posts": float(sum(v.count("POST") for v in peers.values())),
            "gets": float(sum(v.count("GET") for v in peers.values()))}


def engine_page(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


def engine_side(before: str, after: str) -> dict[str, float]:
    """The engine's own means over a replay (ms; `metrics.engine_means_ms`) and its
    prefix-cache hit rate (%), from its pages before and after."""
    out = {f"engine_{k}_ms": v
           for k, v in metrics.engine_means_ms([before], [after]).items() if v is not None}
    hit = metrics.hit_rate(metrics.CacheCounters.from_pages([before]),
                           metrics.CacheCounters.from_pages([after]))
    out["engine_hit_pct"] = 0.0 if hit is None else 100 * hit
    return out


def burst_slope(
    arrivals: list[float], sent: list[float], ttfts: list[float | None]
) -> tuple[float, float]:
    """Medians over the bursts (requests planned at one instant, placed in the order the client
    sent them) of the TTFT (ms) of a burst's first request and of the least-squares slope of TTFT
    over the place in the burst; nan without a burst of 4 or more."""
    bursts: dict[float, list[tuple[float, float]]] = {}
    for at, t0, t in zip(arrivals, sent, ttfts, strict=True):
        if t is not None:
            bursts.setdefault(round(at, 3), []).append((t0, 1e3 * t))
    slopes, firsts = [], []
    for burst in bursts.values():
        n = len(burst)
        if n < 4:
            continue
        ys = [y for _, y in sorted(burst)]
        firsts.append(ys[0])
        mx, my = (n - 1) / 2, sum(ys) / n
        slopes.append(sum((x - mx) * (y - my) for x, y in enumerate(ys))
                      / sum((x - mx) ** 2 for x in range(n)))
    if not slopes:
        return float("nan"), float("nan")
    return statistics.median(firsts), statistics.median(slopes)


def start_fake(ttft_s: float, work: Path, i: int = 0, arrivals: Path | None = None,
               cpus: list[int] | None = None, access_log: bool = True) -> tuple[str, str]:
    """Stand-in engine ``i`` (`fake_engine.py`, its access log ``vllm{i}.log`` in ``work``
    unless not ``access_log``, with ``arrivals`` its ``--arrivals`` file, on ``cpus`` when
    given), started under `real_engines.PROCS`; returns its URL and the KV-event endpoint the
    fleet file names for it (nothing publishes there)."""
    port = free_port()
    p = real_engines.start_engine(
        [sys.executable, str(ROOT / "bench/peers/fake_engine.py"), "--port", str(port),
         "--ttft-s", str(ttft_s),
         *(["--log", str(work / f"vllm{i}.log")] if access_log else []),
         *(["--arrivals", str(arrivals)] if arrivals is not None else [])],
        log_path=None, cpus=cpus)
    url = f"http://127.0.0.1:{port}"
    wait_up(url, p, "fake engine", timeout_s=30)
    return url, f"ipc://{work}/kv{i}.sock"


def bench_slice(start: float, duration: float, rate_scale: float
                ) -> tuple[list[Any], list[bytes]]:
    """The real-engine bench's requests of the trace slice, and their text-completion bodies."""
    planned, _ = plan(load_trace(TRACE), SliceSpec(start, duration, rate_scale, 1.0,
                                                   max_output=16))
    return planned, encode_bodies(planned, "completion-text", real_engines.MODEL,
                                  real_engines.BLOCK)


def gateway_config(engines: list[tuple[str, str]], port: int, sets: str, work: Path,
                   name: str) -> Path:
    """The gateway's fleet file for ``engines`` ((url, KV-event endpoint) each), listening on
    ``port``, changed at the dotted keys of ``sets`` (``PATH:VALUE,...``); written to ``work``."""
    cfg = yaml.safe_load(real_engines.fleet_yaml(engines, 1024, 16, kv_events=True))
    cfg = inferplane_fleet(cfg, [url for url, _ in engines], port, None)
    for item in filter(None, sets.split(",")):
        path, _, raw = item.partition(":")
        real_engines.set_path(cfg, path, yaml.safe_load(raw))
    out = work / f"gateway-{name}.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def start_gateway(config: Path, log: Path, python: str = sys.executable, tree: Path = ROOT
                  ) -> subprocess.Popen[bytes]:
    """The gateway of checkout ``tree`` (its ``src`` first on the path) serving ``config``, run
    by ``python``, once it answers ``/ready``; its output to ``log``."""
    cfg = yaml.safe_load(config.read_text())
    base = f"http://127.0.0.1:{cfg['gateway']['port']}"
    with log.open("wb") as out:
        p = subprocess.Popen([python, "-m", "inferplane.cli", "serve", "--config", str(config),
                              "--log-level", "warning"], stdout=out,
                             stderr=subprocess.STDOUT, cwd=tree,
                             env={**os.environ, "PYTHONPATH": str(tree / "src"),
                                  "HF_HUB_OFFLINE": "1"})
    try:
        wait_up(base, p, f"gateway {config}", path="/ready", interval_s=0.3, log=log)
    except RuntimeError:
        p.kill()
        raise
    return p


def drain_and_reset(url: str) -> None:
    while True:
        page = httpx.get(f"{url}/metrics", timeout=10).text
        if metrics.prom_sum(page, "vllm:num_requests_running") + metrics.prom_sum(
                page, "vllm:num_requests_waiting") == 0:
            break
        time.sleep(0.5)
    httpx.post(f"{url}/reset_prefix_cache", timeout=10).raise_for_status()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", type=float, default=0.0)
    ap.add_argument("--duration", type=float, default=20.0, help="trace seconds")
    ap.add_argument("--rate-scale", type=float, default=1 / 3,
                    help="1/3: one engine gets what each of real_engines.py's three gets")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=PATH:VALUE,... (default: fixed=gateway.scrape_max_duty:null and "
                    "current=)")
    ap.add_argument("--idle-s", type=float, default=20.0)
    ap.add_argument("--python", action="append", default=[], metavar="NAME=PATH",
                    help="run variant NAME's gateway with the interpreter PATH (a venv with "
                    "inferplane's dependencies; the code is this tree's src)")
    ap.add_argument("--executor", choices=real_engines.EXECUTORS, default="uni",
                    help="the engine's executor (real_engines.py; sessions 5-7's numbers: mp)")
    ap.add_argument("--fake-ttft", type=float, default=None, metavar="S",
                    help="bench/peers/fake_engine.py answering after S s instead of vLLM")
    a = ap.parse_args(argv)
    variants = dict(v.split("=", 1) for v in (a.variant or ["fixed=gateway.scrape_max_duty:null",
                                                            "current="]))
    pythons = dict(v.split("=", 1) for v in a.python)
    work = Path(tempfile.mkdtemp(prefix="ip-gap-"))
    planned, bodies = bench_slice(a.start, a.duration, a.rate_scale)
    print(f"{len(planned)} requests over {planned[-1].arrival_s:.0f} s; executor {a.executor}; "
          f"load {os.getloadavg()[0]:.1f}; work {work}", flush=True)
    try:
        fake = a.fake_ttft is not None
        if fake:
            engine = start_fake(a.fake_ttft, work)
            (work / "vllm0.log").touch()
        else:
            (engine,) = real_engines.start_engines(1, 1024, 16, work, executor=a.executor)
        epid = real_engines.PROCS[0].pid  # the API server (its engine core is a child)
        if not fake:
            mc = metrics_cost(engine[0], epid)
            print("GET /metrics: " + ", ".join(f"{k} {v:.2f}" for k, v in mc.items())
                  + f"; load {os.getloadavg()[0]:.1f}", flush=True)
        names = ["direct", *variants]
        rows: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        for rep in range(a.reps):
            for name in names if rep % 2 == 0 else names[::-1]:
                gw = None
                base = engine[0]
                if name != "direct":
                    port = free_port()
                    gw = start_gateway(gateway_config([engine], port, variants[name], work, name),
                                       work / f"gateway-{name}-{rep}.log",
                                       pythons.get(name, sys.executable))
                    base = f"http://127.0.0.1:{port}"
                elog = work / "vllm0.log"
                try:
                    if not fake:
                        drain_and_reset(engine[0])
                    before = "" if fake else engine_page(engine[0])
                    at = elog.stat().st_size
                    e0, g0 = proc_cpu_s(epid), proc_cpu_s(gw.pid) if gw else 0.0
                    recs, _ = asyncio.run(client.replay(
                        base, planned, bodies, "/v1/completions", HEADERS,
                        request_timeout_s=120, deadline_s=planned[-1].arrival_s + 60))
                    e1, g1 = proc_cpu_s(epid), proc_cpu_s(gw.pid) if gw else 0.0
                    with elog.open("rb") as fh:
                        fh.seek(at)
                        conns = connections(fh.read().decode(errors="replace"))
                    side = {} if fake else engine_side(before, engine_page(engine[0]))
                finally:
                    if gw is not None:
                        gw.terminate()
                        gw.wait(15)
                t = sorted(r.ttft_s for r in recs if r.ok and r.ttft_s is not None)
                first, slope = burst_slope([p.arrival_s for p in planned],
                                           [r.sent_s for r in recs],
                                           [r.ttft_s if r.ok else None for r in recs])
                row = {"p50_ms": 1e3 * t[len(t) // 2], "p90_ms": 1e3 * t[int(0.9 * len(t))],
                       "ok": len(t), "engine_cpu_s": e1 - e0, "gateway_cpu_s": g1 - g0,
                       "burst_first_ms": first, "burst_ms_per_place": slope,
                       "load": os.getloadavg()[0], **side, **conns}
                rows[name].append(row)
                print(f"rep {rep} {name:10s} " + ", ".join(
                    f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in row.items()), flush=True)
        print("\nmedians over the repetitions:")
        print("| path | TTFT p50 ms | TTFT p90 ms | first in a burst ms | ms per place in a burst "
              "| engine TTFT mean ms | engine hit % | engine API-server CPU s | gateway CPU s "
              "| connections (with requests) | requests + GETs |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, rs in rows.items():
            def med(k: str, rs: list[dict[str, float]] = rs) -> float:
                return statistics.median(r.get(k, float("nan")) for r in rs)
            print(f"| {name} | {med('p50_ms'):.0f} | {med('p90_ms'):.0f} | "
                  f"{med('burst_first_ms'):.0f} | {med('burst_ms_per_place'):.1f} | "
                  f"{med('engine_ttft_ms'):.0f} | {med('engine_hit_pct'):.1f} | "
                  f"{med('engine_cpu_s'):.2f} | {med('gateway_cpu_s'):.2f} | "
                  f"{med('conns'):.0f} ({med('req_conns'):.0f}) | "
                  f"{med('posts'):.0f} + {med('gets'):.0f} |")
        print("\nidle gateway (no requests):")
        for name, sets in variants.items():
            port = free_port()
            gw = start_gateway(gateway_config([engine], port, sets, work, f"idle-{name}"),
                               work / f"gateway-idle-{name}.log", pythons.get(name, sys.executable))
            try:
                time.sleep(2)
                c0, s0 = proc_cpu_s(gw.pid), switches(gw.pid)
                time.sleep(a.idle_s)
                c1, s1 = proc_cpu_s(gw.pid), switches(gw.pid)
            finally:
                gw.terminate()
                gw.wait(15)
            print(f"{name:10s} {1e3 * (c1 - c0) / a.idle_s:.1f} ms CPU/s, "
                  f"{(s1 - s0) / a.idle_s:.0f} context switches/s; load "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
    finally:
        real_engines.stop_engines()
    return 0


if __name__ == "__main__":
    sys.exit(main())
