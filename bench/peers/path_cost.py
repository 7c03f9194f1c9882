"""bench/peers/path_cost.py: what one request costs a real vLLM engine by the path it came in on.

    python bench/peers/path_cost.py [--seq 20] [--bursts 6] [--burst-size 4] [--reps 2]
                                    [--engine-cpus 1] [--router-cpus 0] [--fake]

One vLLM CPU engine (started as ``real_engines.py`` starts its three), on ``--engine-cpus``;
the client (this process) and each router on ``--router-cpus``. The same requests (the
real-engine bench's text prompts, the first of the Mooncake slice) are sent, path by path,
alternating the order between repetitions:

- ``direct``: straight to the engine;
- ``direct-salt``: straight, with the ``cache_salt`` inferplane adds for the bench's tenant;
- ``vllm-router``: through vllm-router ``cache_aware``;
- ``inferplane``: through ``inferplane serve`` with the fleet file ``real_engines.py`` writes;
- ``inferplane-noscrape``: the same without scrapes or health probes of the engine;
- ``direct-stagger``: straight, each burst's requests sent ``--spacing-ms`` apart (default:
  the spread inferplane gives a burst, measured first on a stand-in engine, below).

First (unless ``--spacing-ms``), a stand-in engine (`fake_engine.py --arrivals`, on the engine
CPUs) takes the same bursts straight, through vllm-router and through inferplane: per place in
the burst (send order), when the request reached the engine after the burst's first send.

Per path: an idle phase (the router up, no requests: the API server's CPU a second, i.e. the
router's scrapes and probes), a sequential phase (``--seq`` requests one after another: the
client's TTFT, the engine's own mean TTFT / queue / prefill from its histograms, the API
server's CPU per request net of the idle rate), and a burst phase (``--bursts`` bursts of
``--burst-size`` requests sent at the same instant). The prefix cache is reset before each
phase. ``--fake`` puts `fake_engine.py` in place of vLLM (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson

ROOT = Path(__file__).resolve().parents[2]
for _p in (str(ROOT / "src"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench.peers import client, metrics, real_engines  # noqa: E402
from bench.peers.fake_engine import prompt_key  # noqa: E402
from bench.peers.gateway_gap import (  # noqa: E402
    HEADERS,
    bench_slice,
    gateway_config,
    start_fake,
    start_gateway,
)
from bench.peers.procs import cpu_ns, free_port, wait_up  # noqa: E402
from inferplane.dispatch.upstream import with_cache_salt  # noqa: E402
from inferplane.placement.isolation import cache_salt, cache_scope  # noqa: E402

VLLM_ROUTER = ROOT / ".bench-venvs" / "vllm-router" / "bin" / "vllm-router"
NOSCRAPE = ("substrates.0.endpoints.0.scrape_metrics:false,"
            "gateway.health_interval_s:60")


def _run_ns(pid: int) -> int:
    """`procs.cpu_ns`, 0 for a process gone meanwhile."""
    try:
        return cpu_ns(pid)
    except OSError:
        return 0


def session_cpu(leader: int) -> tuple[float, float]:
    """(the API server's CPU s, every process of its session's) now, from schedstat."""
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(f[3]) == leader:
            total += _run_ns(int(d.name))
    return _run_ns(leader) / 1e9, total / 1e9


def page(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


def reset(url: str, fake: bool) -> None:
    if not fake:
        httpx.post(f"{url}/reset_prefix_cache", timeout=10).raise_for_status()


async def seq_phase(base: str, bodies: list[bytes], headers: dict[str, str]
                    ) -> list[client.Record]:
    recs = []
    async with aiohttp.ClientSession() as s:
        for i, b in enumerate(bodies):
            rec = client.Record(i)
            await client.send(s, base + "/v1/completions", b,
                              {"Content-Type": "application/json", **headers}, rec, 60)
            recs.append(rec)
            await asyncio.sleep(0.05)
    return recs


async def burst_phase(base: str, bursts: list[list[bytes]], headers: dict[str, str],
                      gap_s: float, spacing_s: float = 0.0) -> list[client.Record]:
    recs: list[client.Record] = []
    hdrs = {"Content-Type": "application/json", **headers}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        k = 0
        for burst in bursts:
            t0 = time.perf_counter()
            rs = [client.Record(k + j) for j in range(len(burst))]
            k += len(burst)
            async def one(j: int, b: bytes, r: client.Record) -> None:
                if spacing_s:
                    await asyncio.sleep(j * spacing_s)
                await client.send(s, base + "/v1/completions", b, hdrs, r, 60)

            await asyncio.gather(*(one(j, b, r)
                                   for j, (b, r) in enumerate(zip(burst, rs, strict=True))))

            recs += rs
            await asyncio.sleep(max(0.0, gap_s - (time.perf_counter() - t0)))
    return recs


def measure(url: str, leader: int, fake: bool, fn: Any) -> dict[str, Any]:
    reset(url, fake)
    time.sleep(0.3)
    before = "" if fake else page(url)
    c0, w0 = session_cpu(leader), time.perf_counter()
    recs = asyncio.run(fn())
    wall = time.perf_counter() - w0
    c1 = session_cpu(leader)
    after = "" if fake else page(url)
    ok = [1e3 * r.ttft_s for r in recs if r.ok and r.ttft_s is not None]
    out: dict[str, Any] = {
        "n": len(recs), "ok": len(ok), "wall_s": round(wall, 3),
        "api_cpu_s": round(c1[0] - c0[0], 4), "all_cpu_s": round(c1[1] - c0[1], 4),
        "ttft": [None if r.ttft_s is None else round(1e3 * r.ttft_s, 2) for r in recs],
        "ttft_mean": round(statistics.fmean(ok), 2) if ok else None,
        "ttft_p50": round(statistics.median(ok), 2) if ok else None,
    }
    if not fake:
        out["engine"] = metrics.engine_means_ms([before], [after])
        out["steps"] = (metrics.prom_sum(after, metrics.STEPS + "_count")
                        - metrics.prom_sum(before, metrics.STEPS + "_count"))
    return out


def start_router(path: str, engine: tuple[str, str], work: Path, rep: int
                 ) -> tuple[subprocess.Popen[bytes] | None, str, dict[str, str]]:
    url = engine[0]
    if path.startswith("direct"):
        return None, url, {}
    port = free_port()
    if path == "vllm-router":
        log = work / f"vllm-router-{rep}.log"
        with log.open("wb") as out:
            p = subprocess.Popen([str(VLLM_ROUTER), "--host", "127.0.0.1", "--port", str(port),
                                  "--worker-urls", url, "--policy", "cache_aware",
                                  "--log-level", "warning", "--request-timeout-secs", "600"],
                                 stdout=out, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_up(base, p, "vllm-router", log=log)
        except RuntimeError:
            p.kill()
            p.wait()
            raise
        return p, base, {}
    sets = NOSCRAPE if path == "inferplane-noscrape" else ""
    conf = gateway_config([engine], port, sets, work, f"{path}-{rep}")
    p = start_gateway(conf, work / f"{path}-{rep}.log")
    return p, f"http://127.0.0.1:{port}", dict(HEADERS)


def arrivals_part(paths: list[str], bursts: list[list[bytes]], work: Path,
                  engine_cpus: list[int], gap_s: float, spacing_s: float
                  ) -> list[dict[str, Any]]:
    """Each path's bursts into a stand-in engine (`fake_engine.py` on ``engine_cpus``, first
    event after 50 ms) that stamps when each request's handler started: per place in the burst
    (send order), the median time from the burst's first send to that arrival (ms)."""
    arr = work / "arrivals.txt"
    arr.touch()
    url, _ = start_fake(0.05, work, arrivals=arr, cpus=engine_cpus, access_log=False)
    fp = real_engines.PROCS[-1]
    out = []
    for path in paths:
        arr.write_text("")
        proc, base, headers = start_router(path.removesuffix("-stagger"), (url, f"ipc://{work}/kvf.sock"),
                                           work, 99)
        try:
            time.sleep(1.0)
            recs = asyncio.run(burst_phase(base, bursts, headers, gap_s,
                                           spacing_s if path.endswith("-stagger") else 0.0))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(15)
        seen = {}
        for line in arr.read_text().splitlines():
            key, arrived, _first = line.split()
            seen[key] = float(arrived)
        flat = [b for bb in bursts for b in bb]
        by_place: dict[int, list[float]] = {}
        way_in: list[float] = []
        k = 0
        for bb in bursts:
            rs = recs[k:k + len(bb)]
            t0 = min(r.sent_s for r in rs)
            for j, (r, b) in enumerate(zip(rs, flat[k:k + len(bb)], strict=True)):
                got = seen.get(prompt_key(orjson.loads(b).get("prompt")))
                if got is None:
                    continue
                by_place.setdefault(j, []).append(1e3 * (got - t0))
                way_in.append(1e3 * (got - r.sent_s))
            k += len(bb)
        row = {"path": path, "matched": len(way_in),
               "arrival_after_burst_start_ms": {j: round(statistics.median(v), 2)
                                                for j, v in sorted(by_place.items())},
               "way_in_p50_ms": round(statistics.median(way_in), 2) if way_in else None,
               "ttft_mean_ms": round(statistics.fmean(
                   [1e3 * r.ttft_s for r in recs if r.ok and r.ttft_s]), 2)}
        print(json.dumps(row), flush=True)
        out.append(row)
    fp.terminate()
    fp.wait(10)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=20)
    ap.add_argument("--bursts", type=int, default=6)
    ap.add_argument("--burst-size", type=int, default=4)
    ap.add_argument("--burst-gap-s", type=float, default=1.0)
    ap.add_argument("--idle-s", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--engine-cpus", default="1")
    ap.add_argument("--router-cpus", default="0")
    ap.add_argument("--paths", default="direct,direct-salt,direct-stagger,vllm-router,"
                    "inferplane,inferplane-noscrape")
    ap.add_argument("--fake", action="store_true")
    ap.add_argument("--spacing-ms", type=float, default=None,
                    help="direct-stagger's gap between a burst's sends (default: inferplane's, "
                    "measured first on a stand-in engine)")
    ap.add_argument("--deadline-s", type=float, default=1e9,
                    help="start no further path after this many seconds")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)  # `timeout`: the engine's session is stopped too
    os.sched_setaffinity(0, [int(c) for c in a.router_cpus.split(",")])
    engine_cpus = [int(c) for c in a.engine_cpus.split(",")]
    work = Path(tempfile.mkdtemp(prefix="ip-pathcost-"))
    began = time.monotonic()
    planned, bodies = bench_slice(0.0, 60.0, 1.0)
    bodies = [b for p, b in zip(planned, bodies, strict=True) if len(p.hash_ids) <= 40]
    seq = bodies[: a.seq]
    rest = bodies[a.seq:]
    bursts = [rest[i * a.burst_size:(i + 1) * a.burst_size] for i in range(a.bursts)]
    salt = cache_salt(cache_scope("demo", None))
    doc: dict[str, Any] = {"seq_n": len(seq), "bursts": [len(x) for x in bursts]}
    spacing_s = None if a.spacing_ms is None else a.spacing_ms / 1e3
    try:
        return _run(a, doc, spacing_s, seq, bursts, salt, work, began, engine_cpus)
    finally:
        real_engines.stop_engines()


def _run(a: argparse.Namespace, doc: dict[str, Any], spacing_s: float | None,
         seq: list[bytes], bursts: list[list[bytes]], salt: str, work: Path, began: float,
         engine_cpus: list[int]) -> int:
    if spacing_s is None:
        rows = arrivals_part(["direct", "vllm-router", "inferplane"], bursts, work,
                             engine_cpus, a.burst_gap_s, 0.0)
        doc["arrivals"] = rows
        by = {r["path"]: r["arrival_after_burst_start_ms"] for r in rows}
        n = a.burst_size - 1
        spread = (by["inferplane"][n] - by["inferplane"][0]) - (by["direct"][n] - by["direct"][0])
        spacing_s = max(0.0, spread / n / 1e3)
        doc["spacing_ms"] = round(1e3 * spacing_s, 3)
        print(f"direct-stagger spacing {1e3 * spacing_s:.2f} ms", flush=True)
    if a.fake:
        engine = start_fake(0.05, work, 0)
        leader = real_engines.PROCS[-1].pid
    else:
        port, kv = free_port(), f"ipc://{work}/kv0.sock"
        cmd = real_engines.vllm_command(port, kv, 1024, 16)
        p = real_engines.start_engine(cmd, work / "vllm.log", real_engines.vllm_env(), work,
                                      engine_cpus)
        leader = p.pid
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        try:
            wait_up(url, p, "engine", timeout_s=240, interval_s=0.5, log=work / "vllm.log")
        except RuntimeError as exc:
            print(exc)
            return 1
        engine = (url, kv)
        print(f"engine up after {time.monotonic() - t0:.0f} s", flush=True)
        # warm: a few requests straight
        asyncio.run(seq_phase(url, seq, {}))
    paths = a.paths.split(",")
    results: list[dict[str, Any]] = []
    try:
        for rep in range(a.reps):
            for path in paths if rep % 2 == 0 else paths[::-1]:
                if time.monotonic() - began > a.deadline_s:
                    print(f"deadline: {path} rep {rep} not run", flush=True)
                    continue
                proc, base, headers = start_router(path, engine, work, rep)
                try:
                    sq = [with_cache_salt(b, salt) for b in seq] if path == "direct-salt" \
                        else seq
                    bs = [[with_cache_salt(b, salt) for b in bb] for bb in bursts] \
                        if path == "direct-salt" else bursts
                    gap = spacing_s if path == "direct-stagger" else 0.0
                    asyncio.run(seq_phase(base, sq[:2], headers))  # untimed: the path's warm-up
                    time.sleep(1.0)
                    c0, w0 = session_cpu(leader), time.perf_counter()
                    time.sleep(a.idle_s)
                    c1, w1 = session_cpu(leader), time.perf_counter()
                    idle_rate = (c1[0] - c0[0]) / (w1 - w0)
                    router_c0 = _run_ns(proc.pid) / 1e9 if proc else 0.0
                    s = measure(engine[0], leader, a.fake,
                                lambda sq=sq, base=base, h=headers: seq_phase(base, sq, h))
                    b = measure(engine[0], leader, a.fake,
                                lambda bs=bs, base=base, h=headers, g=gap: burst_phase(
                                    base, bs, h, a.burst_gap_s, g))
                    router_cpu = (_run_ns(proc.pid) / 1e9 - router_c0) if proc else 0.0
                finally:
                    if proc is not None:
                        proc.terminate()
                        proc.wait(15)
                for ph in (s, b):
                    ph["api_cpu_net_ms_per_req"] = round(
                        1e3 * (ph["api_cpu_s"] - idle_rate * ph["wall_s"]) / max(ph["n"], 1), 2)
                row = {"rep": rep, "path": path,
                       "idle_api_cpu_ms_per_s": round(1e3 * idle_rate, 3),
                       "router_cpu_s": round(router_cpu, 3), "seq": s, "burst": b}
                results.append(row)
                if a.out is not None:
                    a.out.write_text(json.dumps({**doc, "results": results}, indent=1))
                print(json.dumps({k: v for k, v in row.items() if k not in ("seq", "burst")}
                                 | {"seq": {k: v for k, v in s.items() if k != "ttft"},
                                    "burst": {k: v for k, v in b.items() if k != "ttft"}}),
                      flush=True)
    finally:
        real_engines.stop_engines()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
