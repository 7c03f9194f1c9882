"""``inferplane demo``: the emulated heterogeneous fleet, the gateway, and a mixed workload.

Starts ``inferplane emulate`` on the embedded ``hetero`` fleet as a child process (on free
loopback ports), the gateway in this process, then drives an open-loop mixed workload for
``duration`` seconds — interactive multi-turn chat, long-context, batch, embeddings, agent steps
and a sovereign tenant, by the fleet's ``mix:`` — shows progress, and prints requests per
substrate, TTFT p50/p99 and errors per class, spillovers and a sovereignty check. Every child
process is stopped on exit, on error and on Ctrl-C.

Demo tenants get fresh keys (``demo-<tenant>``) in memory; the fleet file's hashes stay untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway, hash_key
from inferplane.config.loader import parse_config
from inferplane.config.schema import FleetConfig, MixEntry
from inferplane.fleet.live import nearest_rank

console = Console(stderr=True)
STREAM: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}


def embedded_fleet(name: str = "hetero") -> tuple[str, str]:
    """(YAML text, label) of a fleet shipped inside the package."""
    path = resources.files("inferplane").joinpath(f"data/fleets/{name}.yaml")
    return path.read_text("utf-8"), f"<embedded {name}.yaml>"


def _free_ports(n: int) -> list[int]:
    import socket

    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(int(s.getsockname()[1]))
    for s in socks:
        s.close()
    return ports


#: upstream keys of the embedded fleet's emulated provider APIs (its endpoints' api_key_env)
DEMO_PROVIDER_KEYS = {
    "INFERPLANE_DEMO_OPENAI_KEY": "sk-demo-openai",
    "INFERPLANE_DEMO_ANTHROPIC_KEY": "sk-demo-anthropic",
}


def prepare(config: FleetConfig) -> tuple[FleetConfig, dict[str, str]]:
    """Move every endpoint to a free port and give every tenant a demo key."""
    raw = config.model_dump(mode="json", by_alias=True, exclude_none=True)
    n = sum(len(s["endpoints"]) for s in raw["substrates"])
    ports = iter(_free_ports(n + 1))
    for s in raw["substrates"]:
        for e in s["endpoints"]:
            base_path = urlsplit(e["url"]).path  # a hosted API's base path stays
            e["url"] = f"http://127.0.0.1:{next(ports)}{base_path}"
            e.get("emulation", {}).pop("kv_events_port", None)
    raw["gateway"]["port"] = next(ports)
    keys = {}
    for t in raw["tenants"]:
        keys[t["name"]] = f"demo-{t['name']}"
        t["api_keys"] = [hash_key(keys[t["name"]])]
    return parse_config(yaml.safe_dump(raw), "<demo fleet>", with_defaults=False), keys


@dataclass
class Stats:
    sent: int = 0
    done: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    ttft: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    per_class: Counter[str] = field(default_factory=Counter)
    errors_by_class: Counter[str] = field(default_factory=Counter)
    per_substrate: Counter[str] = field(default_factory=Counter)
    violations: int = 0


def _words(rng: random.Random, n: int, seed: str) -> str:
    from inferplane.twin.traces.tokens import block_text

    base = zlib.crc32(seed.encode()) % 100_000
    return " ".join(block_text(base + i, 64) for i in range(max(1, n // 64)))


class Workload:
    """Open-loop arrivals (Poisson) drawn from the fleet's mix."""

    def __init__(self, config: FleetConfig, keys: dict[str, str], base: str, rate: float,
                 seed: int) -> None:
        self.config = config
        self.keys = keys
        self.base = base
        self.rate = rate
        self.rng = random.Random(seed)
        self.stats = Stats()
        self.mix: list[MixEntry] = list(config.mix) or [
            MixEntry.model_validate({"tenant": config.tenants[0].name, "class": "interactive",
                                     "fraction": 1.0})
        ]
        served = [(m, s) for s in config.substrates for e in s.endpoints for m in e.models]
        self.embed_model = next((m.name for m, _ in served if m.kind == "embed"), None)
        gen = Counter(m.name for m, _ in served if m.kind == "generate")
        self.gen_model = gen.most_common(1)[0][0]
        self.allowed = {t.name: t.allowed_jurisdictions for t in config.tenants}
        self.substrate_jur = {s.name: s.jurisdiction for s in config.substrates}
        self.sessions: dict[str, list[dict[str, str]]] = {}

    def _request(self, entry: MixEntry) -> tuple[str, dict[str, Any], dict[str, str]]:
        rng = self.rng
        cls = entry.workload_class
        headers = {"Authorization": f"Bearer {self.keys[entry.tenant]}",
                   "x-inferplane-class": cls}
        if entry.region:
            headers["x-inferplane-client-region"] = entry.region
        model = entry.model or self.gen_model
        if cls == "embeddings" and self.embed_model:
            return "/v1/embeddings", {"model": self.embed_model,
                                      "input": _words(rng, 128, str(rng.random()))}, headers
        if cls == "long-context":
            body = {"model": model, "max_tokens": 64, **STREAM,
                    "messages": [{"role": "user", "content": _words(rng, 24_000, "doc")
                                  + " question " + str(rng.random())}]}
            return "/v1/chat/completions", body, headers
        if cls == "batch":
            body = {"model": model, "max_tokens": 256, **STREAM,
                    "messages": [{"role": "user", "content": _words(rng, 1024, str(rng.random()))}]}
            return "/v1/chat/completions", body, headers
        if cls == "agent-step":
            headers["x-inferplane-agent-step"] = str(rng.randint(1, 5))
        sid = f"{entry.tenant}-{rng.randrange(12)}"
        history = self.sessions.setdefault(
            sid, [{"role": "system", "content": _words(rng, 512, f"sys-{entry.tenant}")}])
        history.append({"role": "user", "content": _words(rng, 64, str(rng.random()))})
        if len(history) > 12:
            del history[1:3]
        headers["x-session-id"] = sid
        body = {"model": model, "max_tokens": 48, **STREAM, "messages": list(history)}
        return "/v1/chat/completions", body, headers

    async def one(self, session: aiohttp.ClientSession, entry: MixEntry) -> None:
        path, body, headers = self._request(entry)
        cls = entry.workload_class
        st = self.stats
        st.sent += 1
        st.per_class[cls] += 1
        t0 = time.perf_counter()
        try:
            async with session.post(self.base + path, json=body, headers=headers) as r:
                first = None
                async for _ in r.content.iter_any():
                    if first is None:
                        first = time.perf_counter() - t0
                if r.status != 200:
                    st.errors[f"{cls}: HTTP {r.status}"] += 1
                    st.errors_by_class[cls] += 1
                    return
                sub = r.headers.get("x-inferplane-substrate", "?")
                st.per_substrate[sub] += 1
                allowed = self.allowed.get(entry.tenant)
                if allowed is not None and self.substrate_jur.get(sub) not in allowed:
                    st.violations += 1
                if first is not None:
                    st.ttft[cls].append(first)
        except (TimeoutError, aiohttp.ClientError) as exc:
            st.errors[f"{cls}: {type(exc).__name__}"] += 1
            st.errors_by_class[cls] += 1
        finally:
            st.done += 1

    async def run(self, duration: float, live: Live) -> None:
        weights = [m.fraction for m in self.mix]
        tasks: set[asyncio.Task[None]] = set()
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            start = time.monotonic()
            while (elapsed := time.monotonic() - start) < duration:
                entry = self.rng.choices(self.mix, weights)[0]
                t = asyncio.create_task(self.one(session, entry))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                live.update(self.progress(elapsed, duration))
                await asyncio.sleep(self.rng.expovariate(self.rate))
            while tasks:
                live.update(self.progress(time.monotonic() - start, duration, draining=True))
                await asyncio.wait(tasks, timeout=0.25)

    def progress(self, elapsed: float, duration: float, draining: bool = False) -> Table:
        st = self.stats
        t = Table.grid(padding=(0, 2))
        state = "draining" if draining else f"{min(elapsed, duration):5.1f}/{duration:.0f} s"
        t.add_row("[bold]inferplane demo[/]", state, f"sent {st.sent}", f"done {st.done}",
                  f"errors {sum(st.errors.values())}", f"in flight {st.sent - st.done}")
        return t


def _pct(xs: list[float], q: float) -> float | None:
    return nearest_rank(sorted(xs), q) if xs else None


def report(w: Workload, gateway: Gateway) -> None:
    st = w.stats
    out = Console(width=max(100, Console().width))
    subs = Table(title="Requests per substrate")
    for col in ("substrate", "kind", "region", "jurisdiction", "capacity", "requests"):
        subs.add_column(col)
    for s in w.config.substrates:
        subs.add_row(s.name, s.kind, s.region, s.jurisdiction, s.capacity_class,
                     str(st.per_substrate.get(s.name, 0)))
    out.print(subs)
    classes = Table(title="Per workload class (TTFT measured at the client)")
    for col in ("class", "requests", "TTFT p50 ms", "TTFT p99 ms", "errors"):
        classes.add_column(col)
    for cls, n in sorted(st.per_class.items()):
        p50, p99 = _pct(st.ttft[cls], 50), _pct(st.ttft[cls], 99)
        classes.add_row(cls, str(n), f"{p50 * 1e3:.0f}" if p50 is not None else "-",
                        f"{p99 * 1e3:.0f}" if p99 is not None else "-",
                        str(st.errors_by_class.get(cls, 0)))
    out.print(classes)
    spill = sum(s.value for m in gateway.metrics.spillovers.collect() for s in m.samples
                if s.name.endswith("_total"))
    out.print(f"spillovers recorded: {spill:.0f}   sovereignty violations: {st.violations}")
    for reason, n in st.errors.most_common(5):
        out.print(f"  error: {reason} x{n}")


def _start_emulator(config: FleetConfig, tmp: Path, time_scale: float) -> subprocess.Popen[bytes]:
    path = tmp / "fleet.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True,
                                                     exclude_none=True)))
    with (tmp / "emulator.log").open("wb") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-m", "inferplane.cli", "emulate", "--config", str(path),
             "--time-scale", str(time_scale)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


async def _wait_ready(urls: list[str], proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as s:
        pending = list(urls)
        while pending:
            if proc.poll() is not None:
                raise RuntimeError(f"the emulator exited ({proc.returncode}):\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"emulated endpoints not ready: {pending}")
            parts = urlsplit(pending[0])
            url = f"{parts.scheme}://{parts.netloc}"  # /health is at the root, not the base path
            try:
                async with s.get(url + "/health", timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        pending.pop(0)
                        continue
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.1)


async def run_demo(duration: float, rate: float, seed: int, time_scale: float,
                   fleet_text: str, label: str) -> int:
    for var, key in DEMO_PROVIDER_KEYS.items():  # the emulated providers' keys (the child
        os.environ.setdefault(var, key)          # emulator inherits them)
    config, keys = prepare(parse_config(fleet_text, label))
    tmp = Path(tempfile.mkdtemp(prefix="inferplane-demo-"))
    console.print(f"[bold]inferplane demo[/]: {label}, "
                  f"{sum(len(s.endpoints) for s in config.substrates)} emulated endpoints, "
                  f"{duration:.0f} s at ~{rate:g} req/s (logs in {tmp})")
    gateway = Gateway(config, label)  # builds the policies: a ConfigError starts nothing
    emu = _start_emulator(config, tmp, time_scale)
    runner = None
    try:
        urls = [e.url for s in config.substrates for e in s.endpoints]
        await _wait_ready(urls, emu, tmp / "emulator.log")
        runner = await serve(gateway, "127.0.0.1", config.gateway.port)
        base = f"http://127.0.0.1:{config.gateway.port}"
        console.print(f"gateway on {base}; emulator pid {emu.pid}")
        w = Workload(config, keys, base, rate, seed)
        with Live(w.progress(0, duration), console=console, refresh_per_second=4) as live:
            await w.run(duration, live)
        report(w, gateway)
        return 0 if w.stats.violations == 0 else 1
    finally:
        try:
            if runner is not None:
                await runner.cleanup()
        finally:  # even when the clean-up is cancelled (a second Ctrl-C) or fails
            _stop(emu)
