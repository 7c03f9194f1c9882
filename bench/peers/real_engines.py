"""bench/peers/real_engines.py: the peers' router comparison in front of three real vLLM engines.

    python bench/peers/real_engines.py [--runs 3] [--duration 60] [--rate-scale 1]
                                       [--max-output 16] [--blocks 1024] [--only NAME ...]
                                       [--out docs/benchmarks/peers-real]

1. builds the fidelity tier's tiny Llama if absent (``scripts/fidelity/build_tiny_model.py``
   into ``.fidelity-venv/tiny-llama``);
2. starts three vLLM CPU engines from ``.fidelity-venv`` the way ``tests/fidelity/conftest.py``
   starts one (loopback, offline, ``VLLM_SERVER_DEV_MODE=1`` for ``/reset_prefix_cache``,
   ``VLLM_CPU_KVCACHE_SPACE=1 OMP_NUM_THREADS=1``), with prefix caching, block size 32,
   the model run in the engine core's own process (``--executor uni``, below),
   ``--num-gpu-blocks-override`` ``--blocks``, ``--max-num-seqs 16`` and ZMQ KV events on an
   ``ipc://`` socket (vLLM binds ipc endpoints; inferplane's fleet file names it);
3. writes a fleet file naming the three engines (engine ``vllm``, model ``tiny-llama`` with its
   ``tokenizer`` unless ``--no-tokenizer``, hardware ``cpu``, ``gateway.token_estimate: words``);
4. warms the engines with one untimed replay of the slice's first ``--warmup-s`` seconds (30)
   through the bare relay (the first replay on fresh engines is slower, whichever router sends
   it), then runs ``bench/peers/run.py --fleet URL1,URL2,URL3 --block-tokens 32`` once per
   setup and repetition (alternating the setup order between repetitions; run.py drains the
   engines and resets their prefix caches before each replay);
5. writes ``results.json`` and ``results.md`` (medians over the repetitions, with min–max) to
   ``--out``. Every engine is stopped by process group at the end, also on failure.

Setups (``--only`` takes these names exactly; the default runs the five in ``SETUPS``):
``inferplane default`` (the aiohttp gateway, ``inferplane serve``), ``inferplane envoy`` (the
same fleet file — profile, KV events, tokenizer — given to ``inferplane epp``, the endpoint
picker, behind the real Envoy with the bootstrap of ``inferplane envoy-config``: the client talks
to Envoy, whose C++ data path carries every byte while the picker decides over ext_proc gRPC;
the observer filter on, ``epp.observe_responses``' default; Envoy's ``--concurrency`` is
``--envoy-concurrency``, 1 by default: see `bench.peers.peers.ENVOY_CONCURRENCY`), ``inferplane
round-robin``, ``vllm-router cache_aware``, ``sglang-router cache_aware``; besides them
``python-proxy round_robin`` and the other policies of `bench.peers.peers.setups`, and the
``inferplane default, …`` setups of ``--calibrate``, ``--variant`` and ``--gateway-python``.
For ``inferplane envoy`` the router's CPU and its wait for a CPU are Envoy's and the picker's
together, and ``--router-nice`` / ``--router-rt`` apply to both processes; the same holds for
``envoy null-picker round_robin`` (the same Envoy and bootstrap, `bench/null_picker.py` in the
picker's place, answering at once with the engines in turn: the floor of any Python picker
behind Envoy).

``--calibrate`` first runs ``inferplane calibrate`` against engine 0 (idle, before any replay)
and adds the setup ``inferplane default, calibrated``: the same gateway and profile, its fleet
file naming the fitted hardware profile (``hardware_profiles:``) instead of the table's ``cpu``,
so that the latency the picker weighs (a queue's cost against a hit's saving) is these engines'
own. The other setups keep the table's profile.

``--executor`` (``uni`` by default) picks how each engine runs its model. vLLM's CPU platform
runs it in a worker process of its own (``mp``), which hands every step to the engine core over a
shared-memory queue whose readers spin for 1 s after each read and then wait for a ZMQ
notification; on this bench's host (three engines on two cores) a step's output often waits
about a second before the engine core reads it (the exact cause is not established), so TTFT
falls on steps of ~1.1 s whatever the router does (docs/benchmarks.md, "Real engines, session
13"). ``uni`` (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and ``--distributed-executor-backend uni``;
vLLM's CPU platform allows it with multiprocessing off) runs the model in the engine core
process, still apart from the API server; ``--executor mp`` restores vLLM's CPU default.

``--gateway-python NAME=PATH`` adds the setup ``inferplane default, NAME``: the same gateway
and fleet file run by the interpreter at PATH (a venv with inferplane's dependencies; the code
is this checkout's ``src``), e.g. Python 3.12, on which aiohttp puts a request on the wire as it
is handed over rather than after the rest of a burst's pre-send work (docs/benchmarks.md, "The
gateway's gap, continued").

``--variant NAME=KEY:VALUE[,KEY:VALUE...]`` adds the setup ``inferplane default, NAME``: the
same gateway with its fleet file changed at dotted keys (``gateway.scrape_max_duty:0.01``; a
number indexes a list, ``substrates.0.endpoints.1.kv_events:null``; values are read as YAML),
run in the same alternating order as the others.

``--engine-cpus LIST`` and ``--router-cpus LIST`` (e.g. ``1`` and ``0``) give the engines and
the routers CPUs of their own, as in a deployment where the router never shares the engines'
cores: each engine is put on ``--engine-cpus`` before exec (every process and thread it starts
inherits it), every router setup (each process `bench.peers.procs.Proc` starts: routers, Envoy
and its picker, the warm-up relay, their children) and ``run.py`` itself (the client) on
``--router-cpus``, as is this script (and ``--calibrate``'s run). Both lists are checked against
the CPUs this process may run on, and may not share a CPU. results.json's ``cpu_layout`` (and
results.md) names the layout and what ``/proc/PID/task/TID/status`` showed: every engine
thread's ``Cpus_allowed_list`` once the engines answered (the run stops if one is off its CPUs)
and at the end, and every router and client thread's at the end of each replay
(``router_threads_cpus``, ``client_threads_cpus``).

Each replay also records the CPU time the three engines' processes (every process of their
sessions: API server, engine core) spent while ``run.py`` ran it (``engine_cpu_s``, from
``/proc``, per process: the router's start, its warm-up, the replay, the router's stop), and the
API servers alone (``api_cpu_s``): with the engines saturated the first is whatever CPU is left
to them, while the second is the requests' handling plus what a router asks of the API server
besides them (scrapes of ``/metrics``, health probes).

And what each engine did (``per_engine``, in the fleet's order, from its ``/metrics`` page read
before and after the replay: `bench.peers.metrics.per_engine`): the requests it finished, the
engine steps it ran (``vllm:iteration_tokens_total``'s count) and their tokens, and its own mean
TTFT. results.md sums the steps over the engines (a router that spreads a burst over the engines
makes them run more steps, each with its fixed cost, than one that batches it on fewer) and
lists each engine's requests / steps / TTFT per replay.

And what the engines were asked over HTTP during each replay (``engine_requests``, from the
engines' API servers' access logs, which vLLM writes by default: ``"METHOD path status"`` ->
count summed over the engines, inferplane's filtered ``/metrics/?name[]=…`` as
``/metrics/?filtered``): the completions, a router's scrapes and probes, and the bench's own
reads (each engine's page before and after the replay, the drain, the prefix-cache reset),
alike for every setup. The run log prints it per replay; none with ``--urls``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.peers.peers import envoy_concurrency
from bench.peers.procs import (
    ANY_CPU,
    format_cpu_list,
    free_port,
    parse_cpu_list,
    pin_preexec,
    pin_router_cpus,
    threads_cpus,
    wait_up,
)
from inferplane.config.loader import parse_config
from inferplane.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("FIDELITY_VENV", ROOT / ".fidelity-venv"))
VPY = VENV / "bin" / "python"
MODEL_DIR = VENV / "tiny-llama"
MODEL = "tiny-llama"
BLOCK = 32
MAX_MODEL_LEN = 2304  # Mooncake prompts up to 32k tokens become <= 2048 words at 32 per block
ENVOY = "inferplane envoy"  # bench.peers.peers.ENVOY_EPP: Envoy + `inferplane epp`
ENVOY_NULL = "envoy null-picker round_robin"  # bench.peers.peers.ENVOY_NULL: Envoy + null picker
SETUPS = ["inferplane default", ENVOY, "inferplane round-robin", "vllm-router cache_aware",
          "sglang-router cache_aware"]
CALIBRATED = "inferplane default, calibrated"  # run.py's "inferplane default", fleet_cal.yaml
PROCS: list[subprocess.Popen[bytes]] = []


def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


EXECUTORS = ("uni", "mp")


def vllm_env(executor: str = "uni") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    if executor == "uni":  # the CPU platform forces "mp" unless V1 multiprocessing is off
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.update(VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1", VLLM_HOST_IP="127.0.0.1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9",
               VLLM_SERVER_DEV_MODE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               VLLM_ALLOW_LONG_MAX_MODEL_LEN="1",
               PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


def vllm_command(port: int, kv: str, blocks: int, seqs: int,
                 executor: str = "uni") -> list[str]:
    kv_cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": kv, "topic": ""}
    return [str(VPY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL_DIR),
            "--served-model-name", MODEL, "--enforce-eager", "--dtype", "float32",
            "--block-size", str(BLOCK), "--enable-prefix-caching", "--max-num-seqs", str(seqs),
            "--num-gpu-blocks-override", str(blocks), "--max-model-len", str(MAX_MODEL_LEN),
            "--max-num-batched-tokens", str(MAX_MODEL_LEN), "--enable-prompt-tokens-details",
            "--kv-events-config", json.dumps(kv_cfg), "--host", "127.0.0.1", "--port", str(port),
            "--distributed-executor-backend", executor]


def start_engine(cmd: list[str], log_path: Path | None, env: dict[str, str] | None = None,
                 cwd: Path | None = None, cpus: list[int] | None = None
                 ) -> subprocess.Popen[bytes]:
    """One engine (or stand-in engine) in a session of its own (`PROCS`), its output to
    ``log_path`` (None: discarded), with ``env`` and in ``cwd`` (None: ours), on ``cpus`` only
    when given (set before exec: every process and thread it starts inherits them)."""
    with contextlib.ExitStack() as stack:
        out = (stack.enter_context(log_path.open("wb")) if log_path is not None
               else subprocess.DEVNULL)
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                             start_new_session=True, preexec_fn=pin_preexec(cpus or []))
    PROCS.append(p)
    return p


def start_engines(n: int, blocks: int, seqs: int, work: Path, timeout_s: float = 400,
                  executor: str = "uni", cpus: list[int] | None = None
                  ) -> list[tuple[str, str]]:
    """Start ``n`` engines together (on ``cpus`` only, when given); returns ``(url, kv
    endpoint)`` each once all are healthy."""
    if not (MODEL_DIR / ".built").exists():
        log("building the tiny model …")
        subprocess.run([str(VPY), str(ROOT / "scripts/fidelity/build_tiny_model.py"),
                        str(MODEL_DIR)], check=True, timeout=300, cwd=ROOT)
    out: list[tuple[str, str]] = []
    started: list[subprocess.Popen[bytes]] = []
    for i in range(n):
        port, kv = free_port(), f"ipc://{work}/kv{i}.sock"
        cmd = vllm_command(port, kv, blocks, seqs, executor)
        (work / f"vllm{i}.cmd").write_text(" ".join(cmd) + "\n")
        started.append(start_engine(cmd, work / f"vllm{i}.log", vllm_env(executor), work, cpus))
        out.append((f"http://127.0.0.1:{port}", kv))
    t0 = time.monotonic()
    for i, (url, _) in enumerate(out):
        wait_up(url, started[i], f"vLLM {i}", timeout_s=timeout_s, started_at=t0,
                interval_s=0.5, log=work / f"vllm{i}.log")
        httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [5, 6, 7],
                   "max_tokens": 2, "ignore_eos": True}, timeout=300).raise_for_status()
        log(f"engine {i} ready at {url}")
    return out


def engine_pids() -> list[int]:
    """Every live process of the engines' sessions (each engine is started in a session of
    its own): API servers and engine cores (`engines_cpu`'s reading)."""
    return [pid for pid, _start in engines_cpu() or {}]


def online_cpus() -> list[int]:
    """The host's online CPUs (``/sys/devices/system/cpu/online``; else ``os.cpu_count()``'s)."""
    try:
        spec = Path("/sys/devices/system/cpu/online").read_text().strip()
        return parse_cpu_list(spec, allowed=ANY_CPU)
    except (OSError, ValueError):
        return list(range(os.cpu_count() or 1))


def layout_text(engine_cpus: list[int], router_cpus: list[int],
                engines_here: bool = True) -> str | None:
    """The CPU layout in words (None: nothing pinned); ``engines_here`` False: the engines
    were started elsewhere (``--urls``), on CPUs this run did not set."""
    if not engine_cpus and not router_cpus:
        return None

    def on(cpus: list[int]) -> str:
        if not cpus:
            return "on any CPU"
        return f"on CPU{'s' if len(cpus) > 1 else ''} {format_cpu_list(cpus)}"

    engines = f"engines {on(engine_cpus)}" if engines_here else \
        "engines started elsewhere (--urls, their CPUs not set by this run)"
    return f"{engines}, routers and client {on(router_cpus)}"


def check_layout(got: dict[str, Any], want: list[int]) -> list[str]:
    """The ``Cpus_allowed_list`` values of `bench.peers.procs.threads_cpus`' reading ``got``
    that are not inside ``want`` (empty: every thread where it should be, or nothing asked); a
    thread narrowed to some of ``want`` (vLLM's OMP binding under ``mp``) is where it should
    be."""
    if not want:
        return []

    def inside(k: str) -> bool:
        try:
            return set(parse_cpu_list(k, allowed=ANY_CPU)) <= set(want)
        except ValueError:
            return False

    return [k for k in got.get("cpus", {}) if not inside(k)]


def engines_cpus_for(engine_cpus: list[int], router_cpus: list[int],
                     allowed: list[int]) -> list[int]:
    """The CPUs the engines start on: ``--engine-cpus``; without it but with ``--router-cpus``,
    ``allowed`` (the CPUs this process had before it pinned itself to the router CPUs: a child
    inherits its parent's, so the engines would otherwise run on the router CPUs alone); else
    none set (they inherit this process's, which is not pinned)."""
    return engine_cpus or (list(allowed) if router_cpus else [])


def engines_cpu() -> dict[tuple[int, int], tuple[int, bool]] | None:
    """CPU clock ticks (user + system) of every live process in the engines' sessions (each
    engine is started in a session of its own), by (pid, start time), with whether it is a
    session's leader (an API server: it answers requests, scrapes and probes, while the engine
    core's processes run the model); None where ``/proc`` is absent."""
    sessions = {p.pid for p in PROCS if p.poll() is None}
    if not sessions or not Path("/proc/self/stat").exists():
        return None
    out: dict[tuple[int, int], tuple[int, bool]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        # after the command: state ppid pgrp session ...; utime, stime and starttime are the
        # stat fields 14, 15 and 22
        if int(fields[3]) in sessions:
            out[(int(d.name), int(fields[19]))] = (int(fields[11]) + int(fields[12]),
                                                   int(d.name) in sessions)
    return out


def cpu_delta(before: dict[tuple[int, int], tuple[int, bool]] | None,
              after: dict[tuple[int, int], tuple[int, bool]] | None
              ) -> tuple[float, float] | None:
    """(every process's CPU seconds between the two readings, the API servers'), per process
    (one that started meanwhile counts from zero; one that ended meanwhile is left out: its
    last ticks are not readable)."""
    if before is None or after is None:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    total = leaders = 0
    for key, (ticks, leader) in after.items():
        d = ticks - before.get(key, (0, leader))[0]
        total += d
        leaders += d if leader else 0
    return total / hz, leaders / hz


def set_path(doc: Any, dotted: str, value: Any) -> None:
    """Set ``doc`` (a parsed fleet file) at the dotted key ``dotted``: a missing mapping on
    the way is made, a number indexes a list (``substrates.0.endpoints.1.kv_events``)."""
    node = doc
    *path, last = dotted.split(".")
    for k in path:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def apply_variant(text: str, spec: str) -> str:
    """The fleet file ``text`` with ``spec``'s dotted keys set (``KEY:VALUE,...``)."""
    doc = yaml.safe_load(text)
    for item in spec.split(","):
        key, sep, value = item.partition(":")
        if not sep or not key.strip():
            raise ValueError(f"--variant: {item!r} is not KEY:VALUE")
        set_path(doc, key.strip(), yaml.safe_load(value))
    return yaml.safe_dump(doc, sort_keys=False)


def stop_engines() -> None:
    for p in PROCS:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    for p in PROCS:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def fleet_yaml(engines: list[tuple[str, str]], blocks: int, seqs: int,
               kv_events: bool, tokenizer: bool = True, profile: Path | None = None) -> str:
    """The fleet file; ``profile`` names a calibrated hardware profile file for the substrate."""
    eps = []
    tok = f", tokenizer: {MODEL_DIR}" if tokenizer else ""
    for i, (url, kv) in enumerate(engines):
        eps.append(
            f"      - name: vllm-{i}\n        url: {url}\n        engine: vllm\n"
            f"        models: [{{name: {MODEL}, max_context: {MAX_MODEL_LEN}, precision: fp32"
            f"{tok}}}]\n"
            f"        max_concurrency: 64\n"
            + (f"        kv_events: {kv}\n" if kv_events else "")
            + f"        emulation: {{block_size: {BLOCK}, max_num_seqs: {seqs}, "
            f"num_gpu_blocks: {blocks}, max_num_batched_tokens: {MAX_MODEL_LEN}}}\n")
    hardware = "cpu"
    profiles = ""
    if profile is not None:
        hardware = str(yaml.safe_load(profile.read_text())["hardware"]["name"])
        profiles = f"hardware_profiles: [{profile}]\n"
    return (
        "gateway:\n  host: 127.0.0.1\n  port: 8080\n  scrape_interval_s: 0.1\n"
        "  token_estimate: words\n"
        # /metrics open: the bench reads the gateway's scrapes and probes of the engines
        "  metrics: {public: true}\n"
        + profiles
        + "regions:\n  - name: local\n    egress_usd_per_gb: 0.0\n"
        f"substrates:\n  - name: real-vllm-cpu\n    kind: cpu\n    hardware: {hardware}\n"
        "    region: local\n    jurisdiction: eu\n    cost: {hourly_usd: 1}\n    endpoints:\n"
        + "".join(eps)
        # the bench's inferplane setups send the h100x8 demo tenant's key (sk-h100x8-demo)
        + "tenants:\n  - name: demo\n    api_keys: [\"sha256:25a9d574674bdebdf12a89a37a82c8d5"
        "2317f4289b4c13fc7e7bf5b207c824c6\"]\n    default_class: interactive\n"
        "    region: local\n"
        "mix:\n  - {tenant: demo, class: interactive, region: local, fraction: 1.0}\n"
    )


def versions() -> dict[str, Any]:
    r = subprocess.run([str(VPY), "-c", "import importlib.metadata as m; print(m.version("
                        "'vllm-cpu'), m.version('torch'))"], capture_output=True, text=True)
    v = r.stdout.split()
    return {"vllm-cpu": v[0] if v else None, "torch": v[1] if len(v) > 1 else None}


def calibrate(url: str, work: Path, limit_s: float = 600) -> Path:
    """``inferplane calibrate`` against one idle engine; the fitted profile's path."""
    out = work / "cpu-calibrated.yaml"
    cmd = [sys.executable, "-m", "inferplane.cli", "calibrate", "--endpoint", url, "--model",
           MODEL, "--base", "cpu", "--name", "cpu-calibrated", "--precision", "fp32",
           "--out", str(out)]
    log("calibrating engine 0: " + " ".join(cmd[1:]))
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit_s)
    (work / "calibrate.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0 or not out.exists():
        raise RuntimeError(f"inferplane calibrate exited {p.returncode}: "
                           + (p.stdout + p.stderr)[-800:])
    log(f"   profile {out}")
    return out


ACCESS_LINE = re.compile(r'"(GET|POST|PUT|DELETE|HEAD) (\S+) HTTP/[0-9.]+" (\d{3})')


def engine_log_sizes(work: Path) -> dict[str, int]:
    """The engines' logs' sizes now (``vllm{i}.log`` in ``work``: absent with ``--urls``)."""
    return {f.name: f.stat().st_size for f in sorted(work.glob("vllm*.log"))}


def engine_requests(work: Path, sizes: dict[str, int]) -> dict[str, int] | None:
    """What the engines were asked over HTTP since ``sizes`` (`engine_log_sizes`), from their
    API servers' access logs (uvicorn's, on by default in vLLM), summed over the engines:
    ``"METHOD path status"`` -> count, the query cut off (``?name[]=…`` kept as ``?filtered``,
    inferplane's filtered scrape). The bench's own reads (the engines' pages before and after
    the replay, the drain and the prefix-cache reset) are in it too, alike for every setup.
    None where there are no logs."""
    if not sizes:
        return None
    counts: dict[str, int] = {}
    for name, start in sizes.items():
        with (work / name).open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        for m in ACCESS_LINE.finditer(text):
            path, _, query = m.group(2).partition("?")
            key = f"{m.group(1)} {path}{'?filtered' if 'name' in query else ''} {m.group(3)}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def run_one(name: str, rep: int, urls: list[str], fleet: Path, a: argparse.Namespace,
            work: Path, python: str | None = None) -> dict[str, Any]:
    out = work / f"rep{rep}-{name.replace(' ', '_').replace(',', '')}"
    setup = "inferplane default" if name.startswith("inferplane default,") else name
    cmd = [sys.executable, str(ROOT / "bench/peers/run.py"), "--fleet", ",".join(urls),
           "--fleet-config", str(fleet), "--only", setup, "--block-tokens", str(BLOCK),
           "--token-ids", "tiny-llama",
           "--rate-scale", str(a.rate_scale), "--duration", str(a.duration), "--start",
           str(a.start), "--max-output", str(a.max_output), "--out", str(out), "--no-docs",
           "--budget", "900", "--no-overhead"]
    if getattr(a, "router_cpus", None):  # run.py (the client) and every router it starts
        cmd += ["--router-cpus", a.router_cpus]
    log(f"rep {rep}: {name}")
    t0 = time.monotonic()
    cpu0 = engines_cpu()
    logs0 = engine_log_sizes(work)
    env = {k: v for k, v in os.environ.items() if k != "INFERPLANE_PYTHON"}
    if python:
        env["INFERPLANE_PYTHON"] = python
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=a.setup_limit,
                       env=env)
    cpu = cpu_delta(cpu0, engines_cpu())
    (work / f"rep{rep}-{name.replace(' ', '_').replace(',', '')}.log").write_text(
        p.stdout + p.stderr)
    doc = json.loads((out / "results.json").read_text())
    res = doc["results"][0]
    res["name"] = name
    res["rep"], res["wall_s"] = rep, time.monotonic() - t0
    res["slice"], res["command"] = doc["slice"], doc["command"]
    res["versions"] = doc["versions"]
    res["engine_cpu_s"] = res["api_cpu_s"] = None
    if cpu is not None:
        res["engine_cpu_s"], res["api_cpu_s"] = round(cpu[0], 2), round(cpu[1], 2)
    res["engine_requests"] = engine_requests(work, logs0)
    sm = res.get("summary") or {}
    eng = res.get("engine_ms") or {}
    log(f"   hit {res.get('hit_rate')}, TTFT p50/p90 "
        f"{sm.get('ttft_ms', {}).get('p50')}/{sm.get('ttft_ms', {}).get('p90')} ms, errors "
        f"{sm.get('errors')}/{sm.get('requests')} ({res.get('status')}, {res['wall_s']:.0f}s, "
        f"engines' CPU {res['engine_cpu_s']} s, API servers' {res['api_cpu_s']} s; the "
        f"engines' own TTFT/queue/prefill means {eng.get('ttft')}/{eng.get('queue')}/"
        f"{eng.get('prefill')} ms; router CPU "
        f"{'–' if res.get('cpu_s') is None else round(res['cpu_s'], 2)} s, waited for a CPU "
        f"{res.get('wait_s', '–')} s)")
    asks = res.get("router_asks")
    if asks:
        log(f"   the router asked the engines for {asks['scrapes']:.0f} /metrics pages and "
            f"{asks['probes']:.0f} health probes")
    if res.get("engine_requests"):
        log("   the engines were asked (access logs, summed): " + ", ".join(
            f"{k} x{v}" for k, v in res["engine_requests"].items()))
    per = res.get("per_engine")
    if per:
        log("   per engine (requests / steps / tokens a step / own TTFT mean ms): " + "; ".join(
            f"{e['requests']:.0f} / {e['steps']} / {e['tokens_per_step']} / {e['ttft_ms']}"
            for e in per))
    return res


def summed_steps(res: dict[str, Any]) -> float | None:
    """The engine steps of a replay summed over the engines (None: not recorded)."""
    per = res.get("per_engine")
    if not per or any(e.get("steps") is None for e in per):
        return None
    return float(sum(e["steps"] for e in per))


def asks_text(res: dict[str, Any]) -> str:
    """A replay's ``scrapes / probes`` the router made of the engines, or – (not counted)."""
    asks = res.get("router_asks")
    return "–" if not asks else f"{asks['scrapes']:.0f} / {asks['probes']:.0f}"


def engines_text(res: dict[str, Any]) -> str:
    """A replay's engines as ``requests/steps/own TTFT mean ms`` each, or – (not recorded)."""
    per = res.get("per_engine")
    if not per:
        return "–"

    def n(v: float | None) -> str:
        return "–" if v is None else f"{v:.0f}"

    return ", ".join(f"{n(e['requests'])}/{n(e['steps'])}/{n(e['ttft_ms'])}" for e in per)


def pooled_ttft(runs: list[dict[str, Any]]) -> dict[str, float] | None:
    """P50, P90, P99 and mean TTFT (ms) of every answered request of ``runs`` pooled (the
    percentiles interpolated as `bench.peers.metrics.pct`): ~900 requests for 3 repetitions
    against ~300 for each repetition's own P90, whose median moves by tens of ms between runs
    here. None when a run has no per-request records."""
    xs: list[float] = []
    for r in runs:
        per = r.get("per_request")
        if per is None:
            return None
        xs += [row[4] for row in per if row[4] is not None and row[6]]
    if not xs:
        return None
    xs.sort()

    def at(q: float) -> float:
        k = (len(xs) - 1) * q / 100.0
        lo = int(k)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {"p50": at(50), "p90": at(90), "p99": at(99), "mean": statistics.fmean(xs),
            "requests": len(xs)}


WARMUP_SETUP = "python-proxy round_robin"


def warm_up(urls: list[str], fleet: Path, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One untimed replay of the slice's first ``--warmup-s`` trace seconds through the bare
    relay (`WARMUP_SETUP`), before the first repetition; what it measured, for the record (not
    in the results). run.py resets the prefix caches before each replay, so nothing of it
    stays in the engines' caches."""
    warm = argparse.Namespace(**{**vars(a), "duration": a.warmup_s})
    log(f"warm-up: {a.warmup_s:g} s of the slice through {WARMUP_SETUP}, untimed")
    try:
        r = run_one(WARMUP_SETUP, -1, urls, fleet, warm, work)
    except Exception as exc:  # a failed warm-up is reported, and the runs go on
        log(f"   warm-up FAILED: {type(exc).__name__}: {exc}")
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:1000]}
    return {"status": r.get("status"), "setup": WARMUP_SETUP, "duration_s": a.warmup_s,
            "ttft_ms": (r.get("summary") or {}).get("ttft_ms"), "wall_s": r.get("wall_s")}


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    variants = list(dict.fromkeys(r["name"] for r in results
                                  if r["name"].startswith("inferplane default,")
                                  and r["name"] != CALIBRATED))
    order = [*SETUPS[:1], CALIBRATED, *variants, *SETUPS[1:]]
    order += [n for n in dict.fromkeys(r["name"] for r in results) if n not in order]
    for name in order:
        got = [r for r in results if r["name"] == name and r.get("status") == "ok"]
        if not got:
            continue

        def stat(vals: list[float]) -> dict[str, float]:
            return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}

        steps = [n for n in map(summed_steps, got) if n is not None]
        rows.append({
            "name": name, "runs": len(got),
            "hit_rate": (stat([r["hit_rate"] for r in got])
                         if all(r.get("hit_rate") is not None for r in got) else None),
            "ttft_p50_ms": stat([r["summary"]["ttft_ms"]["p50"] for r in got]),
            "ttft_p90_ms": stat([r["summary"]["ttft_ms"]["p90"] for r in got]),
            "ttft_p99_ms": stat([r["summary"]["ttft_ms"]["p99"] for r in got]),
            **{k: stat([r[k] for r in got]) if all(r.get(k) is not None for r in got) else None
               for k in ("engine_cpu_s", "api_cpu_s", "cpu_s", "wait_s")},
            "engine_ttft_ms": (stat([r["engine_ms"]["ttft"] for r in got])
                               if all((r.get("engine_ms") or {}).get("ttft") is not None
                                      for r in got) else None),
            "engine_steps": stat(steps) if len(steps) == len(got) else None,
            "pooled_ttft_ms": pooled_ttft(got),
            "errors": [r["summary"]["errors"] for r in got],
            "requests": got[0]["summary"]["requests"],
        })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def fmt(s: dict[str, float] | None, pct: bool = False, digits: int = 0) -> str:
        if s is None:
            return "–"
        f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.{digits}f}")
        return f"{f(s['median'])} ({f(s['min'])}–{f(s['max'])})" if s["min"] != s["max"] \
            else f(s["median"])

    lines = ["| router | runs | prefix hit rate | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | "
             "pooled TTFT p50 / p90 / mean ms | "
             "engines' own TTFT, mean ms | engine steps (summed) | engines' CPU s (API "
             "servers') | router's CPU s | router's wait for a CPU s | errors per run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cpu, api = r.get("engine_cpu_s"), r.get("api_cpu_s")
        pool = r.get("pooled_ttft_ms")
        pooled = "–" if pool is None else \
            f"{pool['p50']:.0f} / {pool['p90']:.0f} / {pool['mean']:.0f}"
        lines.append(f"| {r['name']} | {r['runs']} | {fmt(r['hit_rate'], True)} | "
                     f"{fmt(r['ttft_p50_ms'])} | {fmt(r['ttft_p90_ms'])} | "
                     f"{fmt(r['ttft_p99_ms'])} | {pooled} | {fmt(r.get('engine_ttft_ms'))} | "
                     f"{fmt(r.get('engine_steps'))} | "
                     f"{'–' if cpu is None else fmt(cpu, digits=1)}"
                     f"{'' if api is None else ' (' + fmt(api, digits=1) + ')'} | "
                     f"{fmt(r.get('cpu_s'), digits=2)} | {fmt(r.get('wait_s'), digits=2)} | "
                     f"{', '.join(str(e) for e in r['errors'])} of {r['requests']} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Medians with min–max bars: TTFT p50/p90/p99 per router, and the fleet's prefix hit rate."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not rows:
        return False
    x = list(range(len(rows)))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8.0, 7.0), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 2]})

    def bars(ax: Any, key: str, xs: list[float], w: float, scale: float, **kw: Any) -> None:
        if any(r[key] is None for r in rows):  # engines that count no prefix hits
            return
        med = [scale * r[key]["median"] for r in rows]
        lo = [m - scale * r[key]["min"] for m, r in zip(med, rows, strict=True)]
        hi = [scale * r[key]["max"] - m for m, r in zip(med, rows, strict=True)]
        ax.bar(xs, med, w, yerr=[lo, hi], capsize=3, **kw)

    w = 0.27
    for i, (q, color) in enumerate((("p50", "#4c72b0"), ("p90", "#dd8452"), ("p99", "#c44e52"))):
        bars(ax1, f"ttft_{q}_ms", [xi + (i - 1) * w for xi in x], w, 1.0, label=f"TTFT {q}",
             color=color)
    ax1.set_ylabel("TTFT (ms)")
    ax1.legend()
    ax1.set_title(title, fontsize=9)
    ax1.grid(axis="y", alpha=0.3)
    bars(ax2, "hit_rate", [float(xi) for xi in x], 0.6, 100.0, color="#55a868")
    ax2.set_ylabel("prefix hit %")
    ax2.set_xticks(x)
    ax2.set_xticklabels([r["name"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summed_cpus(readings: list[dict[str, Any] | None]) -> dict[str, int]:
    """Threads by ``Cpus_allowed_list`` over several `bench.peers.procs.threads_cpus`
    readings."""
    out: dict[str, int] = {}
    for got in readings:
        for k, n in (got or {}).get("cpus", {}).items():
            out[k] = out.get(k, 0) + n
    return out


def layout_lines(doc: dict[str, Any]) -> list[str]:
    """The CPU layout asked for and what ``/proc`` showed (empty for runs before it was
    recorded)."""
    lay = doc.get("cpu_layout")
    if lay is None or not lay.get("text"):  # nothing pinned: results.md as before
        return []
    ok = [r for r in doc["results"] if r.get("status") == "ok"]

    def fmt(cpus: dict[str, int]) -> str:
        return ", ".join(f"CPU {k}: {n}" for k, n in sorted(cpus.items())) or "none read"

    def want(key: str) -> list[int]:
        spec = lay.get(key)
        return parse_cpu_list(spec, allowed=ANY_CPU) if spec else []

    def checked(got: dict[str, Any], cpus: list[int]) -> str:
        wrong = check_layout(got, cpus)
        return fmt(got.get("cpus", {})) + (
            f" — NOT as asked (CPU {format_cpu_list(cpus)}): {', '.join(wrong)}" if wrong else "")

    start, end = lay.get("engines_at_start") or {}, lay.get("engines_at_end") or {}
    engines, routers = want("engine_cpus"), want("router_cpus")
    text = (f"CPU layout: {lay['text']} (host CPUs {lay.get('host_cpus')}). Read from "
            "`/proc/PID/task/TID/status` (`Cpus_allowed_list`, threads by the CPUs they may run "
            "on): ")
    if lay.get("engines_here", True):
        text += (f"the engines' {start.get('processes', '?')} processes at the start, "
                 f"{checked(start, engines)}")
        if end:
            text += f"; at the end ({end.get('processes', '?')} processes), {checked(end, engines)}"
        text += "; "
    routed = summed_cpus([r.get("router_threads_cpus") for r in ok])
    client = summed_cpus([r.get("client_threads_cpus") for r in ok])
    text += (f"the routers' threads, read at the end of each of the {len(ok)} replays and "
             f"summed, {checked({'cpus': routed}, routers)}; the client's, "
             f"{checked({'cpus': client}, routers)}.")
    return [text, ""]


def render(doc: dict[str, Any], out: Path) -> str:
    """results.md (and results.png) from a results.json document."""
    sl = next((r["slice"] for r in doc["results"] if r.get("slice")), {})
    eng = doc["engines"]
    m = doc["machine"]
    done = sorted({r["rep"] for r in doc["results"] if r.get("status") == "ok"})
    lines = [
        "# Peers on real vLLM engines", "",
        f"Command: `{doc['command']}` — {doc['date']}", "",
        f"Machine: `{' '.join(str(v) for v in m['uname'].values())}`, {m['cores']} cores, "
        f"Python {m['python']}; load average at start "
        f"{tuple(round(x, 1) for x in m['loadavg_start'])}, at end "
        f"{tuple(round(x, 1) for x in m.get('loadavg_end', m['loadavg_start']))} (shared).", "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in {
            **{k: v for r in doc["results"] for k, v in (r.get("versions") or {}).items()},
            **eng["versions"]}.items()), "",
        f"Engines: 3 × vLLM CPU (`{MODEL}`, block size {eng['block_size']}, "
        f"{eng['blocks']} KV blocks = {eng['blocks'] * eng['block_size']} tokens each, "
        f"max_num_seqs {eng['max_num_seqs']}, max_model_len {eng['max_model_len']}, prefix "
        f"caching on; KV events given to inferplane: {eng['kv_events_to_inferplane']}; the "
        f"model's tokenizer given to inferplane: {eng.get('tokenizer_to_inferplane', False)}; "
        "executor: " + ("mp (before --executor)" if "executor" not in eng else
                        eng["executor"] or "unknown (engines given with --urls)") + ").",
        "",
        *layout_lines(doc),
        f"Slice: {sl.get('requests')} requests of the Mooncake conversation trace (trace seconds "
        f"{sl.get('start_s', 0):.0f}–{sl.get('start_s', 0) + sl.get('duration_s', 0):.0f}, "
        f"rate ×{sl.get('rate_scale')}, {sl.get('left_out')} too long left out), one 512-token "
        f"trace block = 32 words, output capped at {sl.get('max_output')}; open-loop over "
        f"{sl.get('span_s', 0):.0f} s: {sl.get('req_per_s', 0):.1f} req/s. Repetitions done: "
        f"{len(done)} (order alternates). Medians, (min–max) over the repetitions; pooled: "
        "every answered request of every repetition together.", "",
        table(doc.get("summary") or aggregate(doc["results"])), "",
    ]
    if any(r["name"] == ENVOY for r in doc["results"] if r.get("status") == "ok"):
        lines[-1:-1] = [  # after a blank line: a line right below a table is one of its rows
            "", f"`{ENVOY}`: Envoy (`--concurrency {doc.get('envoy_concurrency') or '?'}`) on the "
            "data path with `inferplane epp` picking over ext_proc (observer filter on, "
            "`epp.observe_responses`' default), the same fleet file as `inferplane default`; "
            "its router's CPU and wait for a CPU are Envoy's and the picker's together."]
    if any(r["name"] == ENVOY_NULL for r in doc["results"] if r.get("status") == "ok"):
        lines[-1:-1] = [
            "", f"`{ENVOY_NULL}`: the same Envoy (`--concurrency "
            f"{doc.get('envoy_concurrency') or '?'}`) and bootstrap with `bench/null_picker.py` "
            "in the picker's place (no parsing, placement or accounting; the engines in turn): "
            "its router's CPU and wait for a CPU are Envoy's and the null picker's together."]
    for n, gp in (doc.get("gateway_pythons") or {}).items():
        lines[-1:-1] = [f"`{n}`: the gateway run by Python {gp['version']} (`{gp['path']}`).", ""]
    rows = doc.get("summary") or aggregate(doc["results"])
    if plot(rows, out / "results.png", f"3 × vLLM CPU, {len(done)} repetitions: medians, "
            "bars min–max"):
        lines += ["![TTFT and prefix hit rate per router](results.png)", ""]
    bad = [r for r in doc["results"] if r.get("status") != "ok"]
    if bad:
        lines += ["Not measured:", "", *(f"- rep {r.get('rep')} {r['name']}: {r.get('status')}"
                                         f" {str(r.get('reason', ''))[:300]}" for r in bad), ""]
    lines += ["Per run (engines: requests finished / engine steps / own mean TTFT ms of each "
              "engine, in the fleet's order, between the scrapes before and after the replay):",
              "", "| rep | router | hit rate | TTFT p50 | TTFT p90 | engines | engine steps | "
              "router's scrapes / probes of the engines | "
              "engines' CPU s | API servers' CPU s | router's CPU s | router's wait for a CPU s "
              "| errors |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        if r.get("status") == "ok":
            t = r["summary"]["ttft_ms"]
            hit = "–" if r.get("hit_rate") is None else f"{100 * r['hit_rate']:.1f}%"
            lines.append(f"| {r['rep']} | {r['name']} | {hit} | "
                         f"{t['p50']:.0f} | {t['p90']:.0f} | {engines_text(r)} | "
                         f"{'–' if summed_steps(r) is None else f'{summed_steps(r):.0f}'} | "
                         f"{asks_text(r)} | "
                         f"{r.get('engine_cpu_s', '–')} | "
                         f"{r.get('api_cpu_s', '–')} | "
                         f"{'–' if r.get('cpu_s') is None else round(r['cpu_s'], 2)} | "
                         f"{r.get('wait_s', '–')} | {r['summary']['errors']} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def merge(paths: list[Path]) -> dict[str, Any]:
    """Several results.json documents as one (repetitions renumbered in order)."""
    docs = [json.loads(p.read_text()) for p in paths]
    doc = docs[0]
    rep0 = 0
    for d in docs[1:]:
        rep0 = max((r["rep"] for r in doc["results"]), default=-1) + 1
        for r in d["results"]:
            r["rep"] = r["rep"] + rep0
        doc["results"] += d["results"]
        doc["command"] += " ; then " + d["command"]
        doc["machine"]["loadavg_end"] = d["machine"].get("loadavg_end")
    doc["summary"] = aggregate(doc["results"])
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="setups (exact names) to run")
    ap.add_argument("--start", type=float, default=0.0)
    ap.add_argument("--duration", type=float, default=60.0, help="trace seconds per replay")
    ap.add_argument("--warmup-s", type=float, default=30.0,
                    help="trace seconds replayed once through the bare relay before the first "
                    "repetition, untimed, so that no setup meets cold engines (0: none)")
    ap.add_argument("--rate-scale", type=float, default=1.0)
    ap.add_argument("--max-output", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=1024, help="KV blocks per engine")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--no-kv-events", action="store_true",
                    help="do not give inferplane the engines' KV events")
    ap.add_argument("--no-tokenizer", action="store_true",
                    help="do not give inferplane the model's tokenizer (word estimate instead)")
    ap.add_argument("--calibrate", action="store_true",
                    help=f"calibrate engine 0 first and add the setup {CALIBRATED!r}")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY:VALUE,...",
                    help="add the setup 'inferplane default, NAME' with the fleet file changed "
                    "at these dotted keys (e.g. gateway.scrape_max_duty:0.01)")
    ap.add_argument("--executor", choices=EXECUTORS, default="uni",
                    help="where each engine runs its model: in the engine core process (uni) "
                    "or in a worker process of its own (mp, vLLM's CPU default)")
    ap.add_argument("--gateway-python", action="append", default=[], metavar="NAME=PATH",
                    help="add the setup 'inferplane default, NAME': the gateway run by the "
                    "interpreter at PATH")
    ap.add_argument("--router-nice", type=int, default=0,
                    help="start every router (and the warm-up relay) at this niceness, the "
                         "engines at 0: a negative value gives the routers the CPU first on a "
                         "host they share with the engines (needs the privilege to lower it)")
    ap.add_argument("--router-rt", type=int, default=0, metavar="PRIORITY",
                    help="start every router (every thread of it, and the warm-up relay) "
                         "under the real-time round-robin policy (SCHED_RR) at this priority "
                         "(1-99), the engines under the normal one: a woken router then takes a "
                         "CPU from a running engine without waiting for its time slice (needs "
                         "CAP_SYS_NICE or an RLIMIT_RTPRIO of at least the priority); refused "
                         "with --router-cpus, where the routers do not share a CPU with the "
                         "engines and a real-time router would only preempt the client timing "
                         "it")
    ap.add_argument("--engine-cpus", metavar="LIST",
                    help="run the engines (every process and thread they start) only on these "
                    "CPUs (e.g. 1, 1-3, 1,3), set before exec")
    ap.add_argument("--router-cpus", metavar="LIST",
                    help="run every router (every process and thread of it, the warm-up relay "
                    "and calibration included) and the bench's client only on these CPUs "
                    "(e.g. 0); with --engine-cpus, the two lists may not share a CPU; without "
                    "it, the engines (--engines-only too) start on the CPUs this process had "
                    "before it pinned itself (all it may use, these included), not on these "
                    "alone")
    ap.add_argument("--envoy-concurrency", type=int, default=None, metavar="N",
                    help=f"Envoy's worker threads in the setup {ENVOY!r} (default 1: "
                    "bench.peers.peers.ENVOY_CONCURRENCY)")
    ap.add_argument("--setup-limit", type=float, default=600.0, help="seconds per replay")
    ap.add_argument("--budget", type=float, default=3600.0, help="seconds for all replays")
    ap.add_argument("--urls", help="reuse running engines (URL[@KV],...) instead of starting them")
    ap.add_argument("--engines-only", action="store_true",
                    help="start the engines, print their URLs and wait (Ctrl-C stops them)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/peers-real")
    ap.add_argument("--render-only", nargs="*", type=Path, metavar="RESULTS_JSON",
                    help="only (re)write --out's results.md from these results.json files")
    a = ap.parse_args(argv)
    engine_cpus: list[int] = []
    router_cpus: list[int] = []
    for opt, spec in (("--engine-cpus", a.engine_cpus), ("--router-cpus", a.router_cpus)):
        if spec is None:
            continue
        try:
            cpus = parse_cpu_list(spec)
        except ValueError as exc:
            ap.error(f"{opt} {exc}")
        if opt == "--engine-cpus":
            engine_cpus = cpus
        else:
            router_cpus = cpus
    shared = sorted(set(engine_cpus) & set(router_cpus))
    if shared:
        ap.error(f"--engine-cpus {a.engine_cpus} and --router-cpus {a.router_cpus} share CPU "
                 f"{format_cpu_list(shared)}: the engines and the routers are to have CPUs of "
                 "their own")
    if engine_cpus and a.urls:
        ap.error("--engine-cpus starts the engines on those CPUs: it does not apply to --urls")
    if a.router_nice:
        os.environ["PEERS_ROUTER_NICE"] = str(a.router_nice)  # read by procs.Proc in run.py
    if a.envoy_concurrency is not None:
        if a.envoy_concurrency < 1:
            ap.error(f"--envoy-concurrency {a.envoy_concurrency}: at least 1")
        os.environ["PEERS_ENVOY_CONCURRENCY"] = str(a.envoy_concurrency)  # read by peers.py
    if a.router_rt and router_cpus:
        ap.error("--router-rt with --router-cpus: the routers do not share a CPU with the "
                 "engines there, and a real-time router would preempt the client timing it")
    if a.router_rt:
        if not 1 <= a.router_rt <= 99:
            ap.error(f"--router-rt {a.router_rt}: a real-time priority is 1-99")
        try:  # the privilege, on a throwaway child, before any engine starts
            subprocess.run(["chrt", "-r", str(a.router_rt), "true"], check=True,
                           capture_output=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            err = getattr(exc, "stderr", b"") or b""
            ap.error(f"--router-rt {a.router_rt}: cannot start a SCHED_RR process here "
                     f"({err.decode(errors='replace').strip() or exc})")
        os.environ["PEERS_ROUTER_RT"] = str(a.router_rt)  # read by procs.Proc in run.py
    if a.render_only is not None:
        doc = merge(a.render_only or [a.out / "results.json"])
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "results.json").write_text(json.dumps(doc, indent=2, default=str))
        print(render(doc, a.out))
        return 0
    variants: dict[str, str] = {}
    for v in a.variant:
        vname, sep, spec = v.partition("=")
        vname = vname.strip()
        if not sep or not vname or not spec:
            ap.error(f"--variant {v!r}: expected NAME=KEY:VALUE[,KEY:VALUE...]")
        full = f"inferplane default, {vname}"
        if full == CALIBRATED or full in variants:
            ap.error(f"--variant {vname!r}: the setup {full!r} is taken")
        n = len(a.urls.split(",")) if a.urls else 3
        # the spec on a fleet like the one the run writes, before any engine starts; without
        # the tokenizer, which start_engines builds with the model (it may not exist yet)
        probe = fleet_yaml([(f"http://127.0.0.1:{9 + i}", f"ipc:///tmp/x{i}") for i in range(n)],
                           a.blocks, a.max_num_seqs, True, tokenizer=False)
        try:
            parse_config(apply_variant(probe, spec))
        except (ValueError, LookupError, AttributeError, TypeError, ConfigError) as exc:
            ap.error(f"--variant {v!r}: {exc}")
        variants[full] = spec
    pythons: dict[str, str] = {}
    python_versions: dict[str, str] = {}
    for v in a.gateway_python:
        vname, sep, path = v.partition("=")
        full = f"inferplane default, {vname.strip()}"
        if not sep or not vname.strip() or not path:
            ap.error(f"--gateway-python {v!r}: expected NAME=PATH")
        if full == CALIBRATED or full in variants or full in pythons:
            ap.error(f"--gateway-python {v!r}: the setup {full!r} is taken")
        try:
            ver = subprocess.run(
                [path, "-c", "import sys, inferplane.cli; print(sys.version.split()[0])"],
                capture_output=True, text=True, timeout=60, check=True,
                env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        except (OSError, subprocess.SubprocessError) as exc:
            ap.error(f"--gateway-python {v!r}: cannot import inferplane.cli with it: {exc}")
        pythons[full] = path
        python_versions[full] = ver.stdout.strip()
        log(f"{full}: Python {python_versions[full]} at {path}")
    unknown = [n for n in a.only or [] if n.startswith("inferplane default,")
               and n != CALIBRATED and n not in variants and n not in pythons]
    if unknown:
        ap.error(f"--only {unknown}: no --variant or --gateway-python defines them")
    names = a.only or [*SETUPS[:1], *([CALIBRATED] if a.calibrate else []), *SETUPS[1:]]
    names = [*names[:1], *(v for v in [*variants, *pythons] if v not in names), *names[1:]]
    if CALIBRATED in names and not a.calibrate:
        ap.error(f"the setup {CALIBRATED!r} needs --calibrate")
    if a.urls and a.executor != "uni":
        ap.error("--executor starts the engines: it does not apply to --urls")
    if a.calibrate and CALIBRATED not in names:
        ap.error(f"--calibrate calibrates for the setup {CALIBRATED!r}, which --only leaves out")
    host_cpus = online_cpus()
    engines_on = engines_cpus_for(engine_cpus, router_cpus, sorted(os.sched_getaffinity(0))
                                  if router_cpus else [])
    pin_router_cpus(router_cpus)  # this process too, and what it runs besides run.py (calibrate)
    layout = layout_text(engines_on, router_cpus, engines_here=not a.urls)
    if layout:
        log(f"CPU layout: {layout}")
    work = Path(tempfile.mkdtemp(prefix="ip-real-"))
    log(f"work directory {work}")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    t_start = time.monotonic()
    try:
        if a.urls:
            engines = [(u.partition("@")[0], u.partition("@")[2]) for u in a.urls.split(",")]
            kv_events = all(kv for _, kv in engines) and not a.no_kv_events
        else:
            engines = start_engines(3, a.blocks, a.max_num_seqs, work, executor=a.executor,
                                    cpus=engines_on)
            kv_events = not a.no_kv_events
        urls = [u for u, _ in engines]
        cpu_layout: dict[str, Any] = {
            "text": layout, "host_cpus": format_cpu_list(host_cpus),
            "engine_cpus": format_cpu_list(engines_on) or None, "engines_here": not a.urls,
            "router_cpus": format_cpu_list(router_cpus) or None,
            # Cpus_allowed_list of every thread of every engine process, once all answered
            "engines_at_start": threads_cpus(engine_pids()),
        }
        log(f"engines' threads may run on: {cpu_layout['engines_at_start']}")
        found = cpu_layout["engines_at_start"]["processes"]
        if engines_on and not a.urls and found < len(engines):
            raise RuntimeError(f"the engines' CPUs: {found} engine processes found in /proc "
                               f"for {len(engines)} engines, so their CPUs cannot be checked")
        wrong = check_layout(cpu_layout["engines_at_start"], engines_on)
        if wrong:
            raise RuntimeError(f"engines on CPU {format_cpu_list(engines_on)}: engine threads "
                               f"may run on {wrong} (an engine changed its own affinity)")
        if a.engines_only:
            print("ENGINES " + ",".join(f"{u}@{kv}" for u, kv in engines), flush=True)
            while True:
                time.sleep(3600)
        fleet = work / "fleet.yaml"
        fleet.write_text(fleet_yaml(engines, a.blocks, a.max_num_seqs, kv_events,
                                    tokenizer=not a.no_tokenizer))
        fleets: dict[str, Path] = {}
        for vname, spec in variants.items():
            fleets[vname] = work / f"fleet-variant{len(fleets)}.yaml"
            fleets[vname].write_text(apply_variant(fleet.read_text(), spec))
        fleet_cal: Path | None = None
        calibration: dict[str, Any] | None = None
        if a.calibrate:
            t_cal = time.monotonic()
            try:
                profile = calibrate(urls[0], work)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                # the other setups still run; the calibrated one is reported as not measured
                log(f"   calibration FAILED: {exc}")
                calibration = {"failed": str(exc)[:1000]}
            else:
                fleet_cal = work / "fleet_cal.yaml"
                fleet_cal.write_text(fleet_yaml(engines, a.blocks, a.max_num_seqs, kv_events,
                                                tokenizer=not a.no_tokenizer, profile=profile))
                calibration = {"profile": yaml.safe_load(profile.read_text()),
                               "fleet_yaml": fleet_cal.read_text()}
            calibration["seconds"] = round(time.monotonic() - t_cal, 1)
            calibration["log"] = (work / "calibrate.log").read_text(errors="replace")[-20000:] \
                if (work / "calibrate.log").exists() else None
        doc: dict[str, Any] = {
            "date": dt.date.today().isoformat(),
            "command": "python bench/peers/real_engines.py " + " ".join(sys.argv[1:]),
            "machine": {"uname": platform.uname()._asdict(), "cores": os.cpu_count(),
                        "python": platform.python_version(), "loadavg_start": os.getloadavg()},
            "engines": {"urls": urls, "versions": versions(), "blocks": a.blocks,
                        "block_size": BLOCK, "max_num_seqs": a.max_num_seqs,
                        "max_model_len": MAX_MODEL_LEN, "kv_events_to_inferplane": kv_events,
                        "tokenizer_to_inferplane": not a.no_tokenizer,
                        "executor": None if a.urls else a.executor,
                        "command": (work / "vllm0.cmd").read_text().strip()
                        if (work / "vllm0.cmd").exists() else None},
            "fleet_yaml": fleet.read_text(), "calibration": calibration,
            "variants": {n: {"spec": variants[n], "fleet_yaml": fleets[n].read_text()}
                         for n in variants},
            "gateway_pythons": {n: {"path": pythons[n], "version": python_versions[n]}
                                for n in pythons},
            "envoy_concurrency": (envoy_concurrency() if {ENVOY, ENVOY_NULL} & set(names)
                                  else None),
            "cpu_layout": cpu_layout,
            "runs": a.runs, "results": [],
        }
        a.out.mkdir(parents=True, exist_ok=True)
        if a.warmup_s > 0:
            # Freshly started engines answer their first replay slower (their first prefills
            # and steps of each size): the setup that went first in rep 0 was measured on cold
            # engines (in two of session 16's three runs its engines' own mean TTFT read 12-22 %
            # above its later repetitions', and its rep-0 P90 was its worst in all three). A
            # replay of the slice's first seconds through the bare relay warms them for every
            # setup alike.
            doc["warmup"] = warm_up(urls, fleet, a, work)
        for rep in range(a.runs):
            order = names if rep % 2 == 0 else list(reversed(names))
            for name in order:
                if name == CALIBRATED and fleet_cal is None:
                    doc["results"].append({"name": name, "rep": rep, "status": "skipped",
                                           "reason": "the calibration failed (see calibration)"})
                    continue
                if time.monotonic() - t_start > a.budget:
                    log(f"budget spent: skipping rep {rep} {name}")
                    doc["results"].append({"name": name, "rep": rep, "status": "skipped"})
                    continue
                try:
                    r = run_one(name, rep, urls, fleet_cal if name == CALIBRATED and fleet_cal
                                else fleets.get(name) or fleet, a, work, pythons.get(name))
                except Exception as exc:  # one setup failing must not end the run
                    r = {"name": name, "rep": rep, "status": "failed",
                         "reason": f"{type(exc).__name__}: {exc}"[:1000]}
                    log(f"   FAILED: {r['reason']}")
                doc["results"].append(r)
                doc["summary"] = aggregate(doc["results"])
                (a.out / "results.json").write_text(json.dumps(doc, indent=2, default=str))
        doc["machine"]["loadavg_end"] = os.getloadavg()
        doc["cpu_layout"]["engines_at_end"] = threads_cpus(engine_pids())
        doc["wall_s"] = time.monotonic() - t_start
        doc["summary"] = aggregate(doc["results"])
        (a.out / "results.json").write_text(json.dumps(doc, indent=2, default=str))
        print(render(doc, a.out))
    except KeyboardInterrupt:
        log("interrupted: stopping the engines")
        return 130
    finally:
        stop_engines()
    return 0


if __name__ == "__main__":
    sys.exit(main())
