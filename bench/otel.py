"""bench/otel: the gateway's CPU per request with OpenTelemetry on against off, in one run.

Starts a fast fake upstream, an OTLP/HTTP receiver (tests.support.otlp_receiver, decoding every
export) and one gateway process per variant on loopback, differing only in ``telemetry``: off, and
on at each ``--ratios`` sampling ratio (spans exported, GenAI metrics every 5 s). Rounds go through
the variants (the order rotates each round), each sending the same requests (half streamed) at the
same concurrency; the gateway process's CPU time (user + system, ``/proc``) over the round,
background work included (scrapes, the span batcher and metric exports), is divided by the requests
sent; the CPU of the gateway's child processes (the OTLP exporter process of ``telemetry.exporter:
process``) is measured beside it and reported with it. The exporter process's start-up (a one-time
cost: Python and its imports) is waited out after the warm-up and reported apart; a "whole run"
line divides each process's CPU from the first round to the end (idle time during the other
variants' rounds and the last export included) by its requests. Prints per-round CPU ms/request and
each variant's total against off, with the load average, since the machine is shared, and each
gateway's context switches per request (all its threads, ``/proc``: waits on sockets, hand-offs
of the GIL to the batcher thread, preemption), its CPU split into user and system time, and its
minor page faults per request. ``--code NAME=DIR`` runs one variant from another
checkout (another commit's code side by side with this one's, in the same rounds). ``--pin
CPU`` runs every gateway on that CPU and the rest (this client, the upstream) on the others.

``--gateways N`` starts N gateway processes per variant (named ``off#1`` … ``off#N``), all in
the same rounds (the rotation interleaves them): on a shared VM one gateway process can differ
from an identical one by more than the effect (benchmarks.md), so each variant's CPU per request
is then the mean over its N processes, its ratio is taken against the mean of the off
processes, and the spread of its processes' own ratios (min-max) is printed beside it — the off
processes' spread is the run's control.

``--gc`` counts every process's garbage collections and the CPU time in them
(``bench/gcsite/sitecustomize.py``, a `gc.callbacks` hook put on the processes' ``PYTHONPATH``):
per variant, collections per 1,000 requests by generation and the collector's CPU per request,
in the gateway process and in its exporter process, over the rounds.

    python bench/otel.py [--rounds 6] [--requests 600] [--concurrency 8] [--ratios 1,0.05]
                         [--variant NAME=FIELDS] [--code NAME=DIR] [--pin CPU] [--gateways N]
                         [--gc] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import struct
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

from bench.overhead import BODY, KEY  # noqa: E402
from bench.overhead import cpu_seconds as process_cpu  # noqa: E402
from inferplane.config.loader import load_yaml  # noqa: E402
from tests.builders import pool_fleet, tenant, to_yaml  # noqa: E402
from tests.support.otlp_receiver import OtlpReceiver  # noqa: E402
from tests.support.procs import Proc, free_port  # noqa: E402


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in task.read_text().split()]
    return out


def switches(pid: int) -> int:
    """Context switches of the gateway process so far, all its threads (voluntary: it waited,
    on its sockets or for the GIL; involuntary: preempted), from ``/proc``."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(OSError):
            for line in status.read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split()[1])
    return total


def split(pid: int) -> tuple[float, float, int]:
    """(user CPU s, system CPU s, minor page faults) of a process so far (``/proc``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan"), float("nan"), 0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7])


def main_thread_cpu(pid: int) -> float:
    """CPU s (user + system) of the process's main thread (the event loop: its thread id is the
    process id) so far; the rest of the process's CPU is its other threads' (the span batcher,
    the metric exports, the default executor)."""
    try:
        fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


GC_LAYOUT = "<3q3d"
"""``bench/gcsite/sitecustomize.py``'s file: collections by generation, then CPU seconds."""


def gc_stats(folder: Path | None, pid: int) -> tuple[float, ...]:
    """`GC_KEYS`: the collections by generation and the CPU s in them of process ``pid``, then
    the same summed over its child processes (its exporter process), so far, from ``--gc``'s
    hook (zeros without ``--gc``)."""
    total = [0.0] * 12
    if folder is None:
        return tuple(total)
    for p in (pid, *child_pids(pid)):
        try:
            values = struct.unpack(GC_LAYOUT, (folder / f"{p}.gc").read_bytes())
        except (OSError, struct.error):
            continue
        at = 0 if p == pid else 6
        for i, v in enumerate(values):
            total[at + i] += v
    return tuple(total)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(the gateway process's CPU, its child processes' CPU: the OTLP exporter process) so far.
    A child that exits between two readings is missed: none does while a round runs."""
    return process_cpu(pid), sum(process_cpu(c) for c in child_pids(pid))


def _mapping(text: str) -> dict[str, Any]:
    """A `telemetry_variants` value as a dict, read as the gateway reads its file (a key given
    twice is an error)."""
    value = load_yaml(text)
    if not isinstance(value, dict):
        raise ValueError(f"not a mapping: {text}")
    return value


def fleet(port: int, up_port: int, telemetry: str, scrape_interval_s: float = 1.0,
          gateway: dict[str, Any] | None = None) -> str:
    """A gateway's fleet file: ``telemetry`` is its `telemetry:` mapping in YAML (a
    `telemetry_variants` value), ``gateway`` more gateway fields."""
    return to_yaml(pool_fleet(
        up_port, substrate={"cost": {"hourly_usd": 3.0}}, endpoint_fields={"name": "up0"},
        gateway={"port": port, "scrape_interval_s": scrape_interval_s, **(gateway or {})},
        telemetry=_mapping(telemetry),
        tenants=[tenant("bench", KEY, default_class="bench")],
        classes=[{"name": "bench", "profile": "round-robin"}]))


async def burst(session: aiohttp.ClientSession, url: str, n: int, conc: int) -> None:
    sent = 0

    async def worker() -> None:
        nonlocal sent
        while sent < n:
            i = sent
            sent += 1
            body = dict(BODY, stream=i % 2 == 0)
            headers = {"Authorization": f"Bearer {KEY}"}
            async with session.post(url, json=body, headers=headers) as r:
                if r.status != 200:
                    raise RuntimeError(f"{url}: HTTP {r.status}: {await r.text()}")
                await r.read()

    await asyncio.gather(*(worker() for _ in range(conc)))


async def run(args: argparse.Namespace, urls: dict[str, str], pids: dict[str, int],
              exporters: set[str],
              gc_dir: Path | None = None) -> list[dict[str, float | str | int]]:
    rows: list[dict[str, float | str | int]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        for name in urls:  # warm-up: connections, first-request paths
            await burst(s, urls[name], 50, args.concurrency)
        startup = await settle(pids, exporters)
        for name, seconds in startup.items():
            print(f"{name}: exporter process started, {seconds * 1e3:.0f} ms CPU (start-up, "
                  "not counted in the rounds)", file=sys.stderr)
        whole0 = {n: cpu_seconds(p) for n, p in pids.items()}
        for rnd in range(args.rounds):
            names = list(urls)
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for name in order:
                (cpu0, child0), t0 = cpu_seconds(pids[name]), time.perf_counter()
                sw0, sp0 = switches(pids[name]), split(pids[name])
                mt0 = main_thread_cpu(pids[name])
                gc0 = gc_stats(gc_dir, pids[name])
                await burst(s, urls[name], args.requests, args.concurrency)
                await asyncio.sleep(0.2)  # let the round's tail (accounting, batching) settle
                cpu1, child1 = cpu_seconds(pids[name])
                sw1, sp1 = switches(pids[name]), split(pids[name])
                mt1 = main_thread_cpu(pids[name])
                gc1 = gc_stats(gc_dir, pids[name])
                cpu = cpu1 - cpu0
                rows.append({"round": rnd, "variant": name, "n": args.requests,
                             "cpu_ms_per_request": cpu / args.requests * 1e3,
                             "exporter_cpu_ms_per_request": (child1 - child0) / args.requests * 1e3,
                             "switches_per_request": (sw1 - sw0) / args.requests,
                             "user_ms_per_request": (sp1[0] - sp0[0]) / args.requests * 1e3,
                             "system_ms_per_request": (sp1[1] - sp0[1]) / args.requests * 1e3,
                             "minor_faults_per_request": (sp1[2] - sp0[2]) / args.requests,
                             "main_thread_ms_per_request": (mt1 - mt0) / args.requests * 1e3,
                             "wall_s": time.perf_counter() - t0,
                             **{f"gc_{k}": b - a for k, a, b in zip(GC_KEYS, gc0, gc1,
                                                                    strict=True)},
                             "load1": os.getloadavg()[0]})
                print(f"round {rnd} {name}: {rows[-1]['cpu_ms_per_request']:.3f} CPU ms/request, "
                      f"exporter {rows[-1]['exporter_cpu_ms_per_request']:.3f} "
                      f"(load {rows[-1]['load1']:.1f})", file=sys.stderr)
        await asyncio.sleep(6)  # the last export interval (metrics, the spans' last batch)
        for name, pid in pids.items():  # the whole run: idle time in other variants' rounds too
            (g1, c1), (g0, c0) = cpu_seconds(pid), whole0[name]
            rows.append({"variant": name, "whole_run": 1, "n": args.requests * args.rounds,
                         "cpu_ms_per_request": (g1 - g0) / (args.requests * args.rounds) * 1e3,
                         "exporter_cpu_ms_per_request":
                         (c1 - c0) / (args.requests * args.rounds) * 1e3})
    return rows


async def settle(pids: dict[str, int], exporters: set[str],
                 timeout_s: float = 30.0) -> dict[str, float]:
    """Wait until every gateway with an exporter process has it running and idle (its start-up
    CPU is a one-time cost, reported apart); its CPU so far by variant."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, float] = {}
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        now = {n: cpu_seconds(p)[1] for n, p in pids.items() if child_pids(p)}
        if set(now) >= exporters and now == last:
            return now
        last = now
    return last


GC_KEYS = ("gen0", "gen1", "gen2", "gen0_s", "gen1_s", "gen2_s",
           "exp_gen0", "exp_gen1", "exp_gen2", "exp_gen0_s", "exp_gen1_s", "exp_gen2_s")
"""A round's `gc_stats` differences (``gc_`` + each): the gateway's, then its exporter's."""


def print_gc(inst: dict[str, str], rows: list[dict[str, float | str | int]]) -> None:
    """``--gc``: each variant's collections per 1,000 requests (gen0/gen1/gen2) and the
    collector's CPU µs per request, in the gateway and in its exporter process, over all its
    processes' rounds."""
    print("| variant | gateway collections per 1,000 requests, gen0 / gen1 / gen2 | gateway GC "
          "µs/request, gen0 / gen1 / gen2 | all | exporter collections per 1,000 requests | "
          "exporter GC µs/request |")
    print("|---|---|---|---|---|---|")
    for v in dict.fromkeys(inst.values()):
        mine = [r for r in rows if inst[str(r["variant"])] == v]
        n = sum(float(r["n"]) for r in mine)
        tot = {k: sum(float(r[f"gc_{k}"]) for r in mine) for k in GC_KEYS}
        per = [1e3 * tot[f"gen{g}"] / n for g in range(3)]
        us = [1e6 * tot[f"gen{g}_s"] / n for g in range(3)]
        ex = [1e3 * tot[f"exp_gen{g}"] / n for g in range(3)]
        ex_us = 1e6 * sum(tot[f"exp_gen{g}_s"] for g in range(3)) / n
        print(f"| {v} | {per[0]:.1f} / {per[1]:.2f} / {per[2]:.3f} | {us[0]:.2f} / {us[1]:.2f} "
              f"/ {us[2]:.2f} | **{sum(us):.2f}** | {ex[0]:.1f} / {ex[1]:.2f} / {ex[2]:.3f} | "
              f"{ex_us:.2f} |")


def telemetry_variants(ratios: str, extra: list[str], endpoint: str) -> dict[str, str]:
    """Each variant's `telemetry:` mapping: off, on at each sampling ratio, and the ``--variant``
    ones (telemetry fields; `enabled` and the receiver's endpoint added unless given)."""
    telemetry = {"off": "{enabled: false}"}
    for r in ratios.split(","):
        telemetry[f"on@{float(r):g}"] = (
            f"{{enabled: true, endpoint: '{endpoint}', sample_ratio: {float(r)}, "
            "export_interval_s: 5}")
    for item in extra:
        name, _, fields = item.partition("=")
        telemetry[name] = (f"{{{fields}}}" if "enabled" in fields else
                           f"{{enabled: true, endpoint: '{endpoint}', "
                           f"export_interval_s: 5, {fields}}}")
        try:
            _mapping(telemetry[name])
        except (yaml.YAMLError, ValueError) as e:  # one line, not a traceback
            raise SystemExit(f"--variant {item}: bad telemetry fields: "
                             + " ".join(str(e).split())) from None
    return telemetry


def code_trees(items: list[str], variants: dict[str, str]) -> dict[str, Path]:
    """``--code NAME=DIR`` options: variant NAME's gateway (and so its exporter process) imports
    inferplane from ``DIR/src`` (a copy of another commit, e.g. ``git archive main | tar -x -C
    DIR``) instead of this one's: old and new code side by side in one run."""
    out: dict[str, Path] = {}
    for item in items:
        name, _, folder = item.partition("=")
        src = Path(folder).resolve() / "src"
        if name not in variants or not (src / "inferplane").is_dir():
            raise SystemExit(f"--code {item}: no variant {name!r} or no {src}/inferplane")
        out[name] = src
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=600, help="requests per round and variant")
    ap.add_argument("--ratios", default="1,0.05", help="sampling ratios of the on variants")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FIELDS",
                    help="another variant: telemetry fields as YAML flow mapping items, e.g. "
                    "'metrics-only=sample_ratio: 0' (enabled, the receiver's endpoint added), or "
                    "'off2=enabled: false' (a second gateway with it off: the bench's own noise)")
    ap.add_argument("--code", action="append", default=[], metavar="NAME=DIR",
                    help="run variant NAME from the checkout DIR (its src/), e.g. 'base@1=/tmp/"
                    "base' with --variant 'base@1=sample_ratio: 1': another commit side by side")
    ap.add_argument("--scrape-interval", type=float, default=1.0,
                    help="gateway.scrape_interval_s (background CPU counted in every round)")
    ap.add_argument("--pin", type=int, default=None, metavar="CPU",
                    help="run every gateway (and so its exporter process) on CPU number CPU "
                    "and this client and the fake upstream on the others: each gateway then "
                    "runs where the others ran, whichever CPU the scheduler would have chosen")
    ap.add_argument("--gateways", type=int, default=1, metavar="N",
                    help="gateway processes per variant (all interleaved in the same rounds): "
                    "ratios against the mean of the off processes, with their spread")
    ap.add_argument("--gc", action="store_true",
                    help="count every process's garbage collections and their CPU time "
                    "(bench/gcsite: a gc.callbacks hook); a table per variant")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.gateways < 1:
        raise SystemExit("--gateways: at least 1")
    if args.pin is not None:  # this client, the receiver's thread, the upstream: the others
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)) - {args.pin} or {args.pin})
    tmp = Path(tempfile.mkdtemp(prefix="ip-otel-"))
    receiver = OtlpReceiver().start()
    up_port = free_port()
    telemetry = telemetry_variants(args.ratios, args.variant, receiver.endpoint)
    code = code_trees(args.code, telemetry)
    # the gateway processes: instance name -> its variant (interleaved: off#1, on@1#1, off#2 …)
    inst = {(f"{v}#{k}" if args.gateways > 1 else v): v
            for k in range(1, args.gateways + 1) for v in telemetry}
    ports = {name: free_port() for name in inst}
    procs = [Proc(["-m", "tests.support.fake_upstream", "--port", str(up_port), "--mode", "fast"],
                  tmp / "up.log")]
    gc_dir = None
    if args.gc:  # every process started from here on loads the hook (bench/gcsite)
        gc_dir = tmp / "gc"
        gc_dir.mkdir()
        os.environ["INFERPLANE_BENCH_GC"] = str(gc_dir)
        os.environ["PYTHONPATH"] = os.pathsep.join(  # no empty entry: it would add the cwd
            p for p in (str(ROOT / "bench" / "gcsite"), os.environ.get("PYTHONPATH")) if p)
    load_before = os.getloadavg()
    try:
        procs[0].wait_http(f"http://127.0.0.1:{up_port}/health")
        gws = {}
        for name, port in ports.items():
            cfg = tmp / f"{name}.yaml"
            cfg.write_text(fleet(port, up_port, telemetry[inst[name]], args.scrape_interval))
            gws[name] = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg),
                              "--log-level", "warning"], tmp / f"gw-{name}.log",
                             code.get(inst[name]))
            procs.append(gws[name])
        for name, port in ports.items():
            if args.pin is not None:  # its threads, and the exporter process it starts
                for task in Path(f"/proc/{gws[name].p.pid}/task").iterdir():
                    os.sched_setaffinity(int(task.name), {args.pin})
            gws[name].wait_http(f"http://127.0.0.1:{port}/ready")
        urls = {n: f"http://127.0.0.1:{p}/v1/chat/completions" for n, p in ports.items()}
        exporters = {n for n, v in inst.items()
                     if "enabled: true" in telemetry[v] and "exporter: thread" not in telemetry[v]}
        rows = asyncio.run(run(args, urls, {n: g.p.pid for n, g in gws.items()}, exporters,
                               gc_dir))
    finally:
        for p in reversed(procs):
            p.stop()
        receiver.stop()
    load_after = os.getloadavg()
    spans = len(receiver.spans())
    variants = list(inst)  # the gateway processes (the variants themselves when --gateways 1)
    whole = {str(r["variant"]): r for r in rows if "whole_run" in r}
    rows = [r for r in rows if "whole_run" not in r]
    per = {v: [float(r["cpu_ms_per_request"]) for r in rows if r["variant"] == v]
           for v in variants}
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    print(f"# bench/otel — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC — git {git} — "
          f"{platform.node()} ({os.cpu_count()} CPUs), Python {platform.python_version()} — "
          f"{args.rounds} rounds × {args.requests} requests × {len(telemetry)} variants"
          + ("" if args.gateways == 1 else f" × {args.gateways} gateway processes each") + ", "
          f"concurrency {args.concurrency}, half streamed"
          + ("" if args.pin is None else f", the gateways on CPU {args.pin}")
          + f" — load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print("| round | " + " | ".join(f"{v} CPU ms/request" for v in variants) + " |")
    print("|---" * (len(variants) + 1) + "|")
    for i in range(args.rounds):
        print(f"| {i} | " + " | ".join(f"{per[v][i]:.3f}" for v in variants) + " |")
    print("| **mean** | " + " | ".join(f"{statistics.fmean(per[v]):.3f}" for v in variants)
          + " |")
    first = variants[0]  # "off" (or "off#1")
    off = sum(per[first])
    result: dict[str, dict[str, float]] = {}
    child = {v: [float(r["exporter_cpu_ms_per_request"]) for r in rows if r["variant"] == v]
             for v in variants}
    for v in variants[1:]:
        ratios = [a / b for a, b in zip(per[v], per[first], strict=True)]
        both = sum(per[v]) + sum(child[v])
        result[v] = {"ratio": sum(per[v]) / off, "median_round_ratio": statistics.median(ratios),
                     "with_exporter_process_ratio": both / off,
                     "exporter_cpu_ms_per_request": statistics.fmean(child[v])}
        print(f"{v}: gateway CPU per request {sum(per[v]) / off:.3f}x off "
              f"(median round {statistics.median(ratios):.3f}x); with its exporter process "
              f"{both / off:.3f}x ({statistics.fmean(child[v]):.3f} ms/request there)")
    sw = {v: statistics.fmean(float(r["switches_per_request"]) for r in rows
                              if r["variant"] == v) for v in variants}
    print("gateway context switches per request (all threads): "
          + ", ".join(f"{v} {sw[v]:.2f}" for v in variants))
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        loop = [float(r["main_thread_ms_per_request"]) for r in mine]
        rest = [float(r["cpu_ms_per_request"]) - m for r, m in zip(mine, loop, strict=True)]
        print(f"{v}: user {statistics.fmean(float(r['user_ms_per_request']) for r in mine):.3f} + "
              f"system {statistics.fmean(float(r['system_ms_per_request']) for r in mine):.3f} "
              "ms/request, minor page faults "
              f"{statistics.fmean(float(r['minor_faults_per_request']) for r in mine):.2f}/request"
              f"; main thread (event loop) {statistics.fmean(loop):.3f}, other threads "
              f"{statistics.fmean(rest):.3f} ms/request")
    w_off = float(whole[first]["cpu_ms_per_request"])
    for v in variants[1:]:
        w = whole[v]
        g, c = float(w["cpu_ms_per_request"]), float(w["exporter_cpu_ms_per_request"])
        result[v]["whole_run_ratio"] = g / w_off
        result[v]["whole_run_with_exporter_process_ratio"] = (g + c) / w_off
        print(f"{v}, whole run (idle time in the other variants' rounds and the last export "
              f"included): gateway {g / w_off:.3f}x off, with its exporter process "
              f"{(g + c) / w_off:.3f}x ({c:.3f} ms/request there)")
    gateways = by_variant(inst, per, child, rows) if args.gateways > 1 else {}
    if args.gc:
        print_gc(inst, rows)
    print(f"spans received by the OTLP receiver: {spans}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "whole_run": whole, "result": result,
                                         "gateways": gateways, "spans": spans}, indent=2))


def by_variant(inst: dict[str, str], per: dict[str, list[float]],
               child: dict[str, list[float]],
               rows: list[dict[str, float | str | int]]) -> dict[str, dict[str, float]]:
    """``--gateways N``: each variant's mean CPU per request over its N gateway processes
    against the mean of the off processes, with the min-max of its processes' own ratios (the
    off processes' spread is the control); printed, and returned for ``--json``."""
    names = {v: [g for g, of in inst.items() if of == v] for v in dict.fromkeys(inst.values())}
    mean = {g: statistics.fmean(per[g]) for g in inst}
    both = {g: mean[g] + statistics.fmean(child[g]) for g in inst}
    loop = {g: statistics.fmean(float(r["main_thread_ms_per_request"]) for r in rows
                                if r["variant"] == g) for g in inst}
    off = statistics.fmean(mean[g] for g in names["off"])
    loop_off = statistics.fmean(loop[g] for g in names["off"])
    out: dict[str, dict[str, float]] = {}
    print(f"| variant (mean of {len(names['off'])} gateway processes) | CPU ms/request | "
          "gateway vs off | processes' ratios min-max | gateway + exporter vs off | "
          "processes' ratios min-max | event loop vs off |")
    print("|---|---|---|---|---|---|---|")
    for v, gs in names.items():
        m = statistics.fmean(mean[g] for g in gs)
        b = statistics.fmean(both[g] for g in gs)
        own = [mean[g] / off for g in gs]
        own_b = [both[g] / off for g in gs]
        lp = statistics.fmean(loop[g] for g in gs) / loop_off
        out[v] = {"cpu_ms_per_request": m, "ratio": m / off, "min": min(own), "max": max(own),
                  "with_exporter_ratio": b / off, "with_exporter_min": min(own_b),
                  "with_exporter_max": max(own_b), "event_loop_ratio": lp}
        print(f"| {v} | {m:.3f} | **{m / off:.3f}x** | {min(own):.3f}x-{max(own):.3f}x | "
              f"{b / off:.3f}x | {min(own_b):.3f}x-{max(own_b):.3f}x | {lp:.3f}x |")
    return out


if __name__ == "__main__":
    main()
