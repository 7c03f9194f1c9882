"""``inferplane demo``: the plane on the emulated heterogeneous fleet, told in phases.

Starts ``inferplane emulate`` on the embedded ``hetero`` fleet as child processes (on free
loopback ports; the ``eu-h100-8b`` pool in a process of its own so that its zone can fail), the
gateway in this process, then drives open-loop traffic through phases, each printed as it runs:

1. **steady** — the fleet's ``mix:`` (interactive chat, agent steps, long context, embeddings,
   batch, the sovereign tenant);
2. **surge** — EU interactive traffic past the reservations' ``committed_concurrency``: reserved
   exhausted, spillover to burst and provider capacity (recorded);
3. **long context** — prompts beyond every GPU pool's context, no class header: giant-context;
4. **agent steps** — low-latency silicon while it meets the step's SLO;
5. **provider 429s** — a hosted-only class on a provider whose emulated quota is below what it
   declares: 429 with Retry-After, ejection, the move recorded as a spillover;
6. **regional outage** — the ``eu-h100-8b`` emulator process is killed: failover, recorded.

The sovereign tenant sends throughout and must stay on its own jurisdiction. The report: requests
and spend per substrate kind, cost per 1M tokens by kind, spillovers by reason, errors, and one
decision record in full — all read back from the gateway's own ledger. Every child process is
stopped on exit, on error and on Ctrl-C.

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
from collections.abc import Callable
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
Request = tuple[str, str, dict[str, Any], dict[str, str], str]  # label, path, body, headers, tenant

HOSTED_CLASS = "hosted"  # added by the demo: interactive, provider APIs only
SOVEREIGN_RATE = 1.0  # the sovereign tenant's requests/s, in every phase
OUTAGE_SUBSTRATE = "eu-h100-8b"  # its own emulator process: the regional outage kills it
PROVIDER_QUOTA_RPM = 10  # the demo's emulated quota of us-provider-70b (it declares 1200/min)


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
    if any(s["kind"] == "provider-api" for s in raw["substrates"]) and not any(
        c["name"] == HOSTED_CLASS for c in raw.get("classes", [])
    ):
        raw.setdefault("classes", []).append({
            "name": HOSTED_CLASS, "ttft_slo_ms": 3000, "itl_slo_ms": 200,
            "allowed_kinds": ["provider-api"], "default_max_tokens": 256,
        })
    for s in raw["substrates"]:
        for e in s["endpoints"]:
            if e["name"] == "us-provider-70b-0":  # a quota below what it declares: real 429s
                e.setdefault("emulation", {})["rate_limit_rpm"] = PROVIDER_QUOTA_RPM
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
    decisions: list[str] = field(default_factory=list)


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
        self.phase_name = "steady"

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

    def _surge(self) -> Request:
        """EU interactive chat with long answers: holds reserved slots for seconds."""
        rng = self.rng
        headers = self._headers("acme", "eu-west")
        body = {"model": self.gen_model, "max_tokens": 256, **STREAM,
                "messages": [{"role": "user", "content": _words(rng, 256, str(rng.random()))}]}
        return "surge", "/v1/chat/completions", body, headers, "acme"

    def _long(self) -> Request:
        """A prompt beyond every GPU pool's context, and no class header."""
        rng = self.rng
        headers = self._headers("acme", "us-east")
        body = {"model": self.gen_model, "max_tokens": 32, **STREAM,
                "messages": [{"role": "user", "content": _words(rng, 40_000, "contract")
                              + " question " + str(rng.random())}]}
        return "long-context", "/v1/chat/completions", body, headers, "acme"

    def _agent(self) -> Request:
        rng = self.rng
        headers = self._headers("acme", "us-east")
        headers["x-inferplane-agent-step"] = str(rng.randint(1, 8))
        headers["x-inferplane-workflow"] = f"agent-{rng.randrange(4)}"
        body = {"model": self.gen_model, "max_tokens": 48, **STREAM,
                "messages": [{"role": "user", "content": _words(rng, 384, str(rng.random()))}]}
        return "agent-step", "/v1/chat/completions", body, headers, "acme"

    def _hosted(self) -> Request:
        """The 70B through the hosted-only class: the provider APIs."""
        rng = self.rng
        headers = self._headers("acme", "us-east")
        headers["x-inferplane-class"] = HOSTED_CLASS
        body = {"model": "llama-3.1-70b", "max_tokens": 32, **STREAM,
                "messages": [{"role": "user", "content": _words(rng, 256, str(rng.random()))}]}
        return HOSTED_CLASS, "/v1/chat/completions", body, headers, "acme"

    def _eu(self) -> Request:
        rng = self.rng
        headers = self._headers("acme", "eu-west")
        body = {"model": self.gen_model, "max_tokens": 48, **STREAM,
                "messages": [{"role": "user", "content": _words(rng, 256, str(rng.random()))}]}
        return "interactive", "/v1/chat/completions", body, headers, "acme"

    def _sovereign(self) -> Request:
        rng = self.rng
        headers = self._headers("bund", "eu-west")
        body = {"model": self.gen_model, "max_tokens": 32, **STREAM,
                "messages": [{"role": "user", "content": _words(rng, 256, str(rng.random()))}]}
        return "sovereign", "/v1/chat/completions", body, headers, "bund"

    def _headers(self, tenant: str, region: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}",
                "x-inferplane-client-region": region}

    def _mixed(self) -> Request:
        entry = self.rng.choices(self.mix, [m.fraction for m in self.mix])[0]
        path, body, headers = self._request(entry)
        return entry.workload_class, path, body, headers, entry.tenant

    async def one(self, session: aiohttp.ClientSession, req: Request) -> None:
        label, path, body, headers, tenant = req
        st = self.stats
        st.sent += 1
        st.per_class[label] += 1
        t0 = time.perf_counter()
        try:
            async with session.post(self.base + path, json=body, headers=headers) as r:
                first = None
                async for _ in r.content.iter_any():
                    if first is None:
                        first = time.perf_counter() - t0
                if r.status != 200:
                    st.errors[f"{self.phase_name}: {label}: HTTP {r.status}"] += 1
                    st.errors_by_class[label] += 1
                    return
                sub = r.headers.get("x-inferplane-substrate", "?")
                st.per_substrate[sub] += 1
                st.decisions.append(r.headers.get("x-inferplane-decision-id", ""))
                allowed = self.allowed.get(tenant)
                if allowed is not None and self.substrate_jur.get(sub) not in allowed:
                    st.violations += 1
                if first is not None:
                    st.ttft[label].append(first)
        except (TimeoutError, aiohttp.ClientError) as exc:
            st.errors[f"{self.phase_name}: {label}: {type(exc).__name__}"] += 1
            st.errors_by_class[label] += 1
        finally:
            st.done += 1

    async def phase(
        self,
        session: aiohttp.ClientSession,
        name: str,
        seconds: float,
        rate: float,
        make: Callable[[], Request],
        live: Live,
    ) -> None:
        """Open-loop arrivals of ``make()`` at ``rate`` for ``seconds``, the sovereign tenant's
        ~1 request/s alongside; waits for them to finish."""
        self.phase_name = name
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        nxt = {"main": 0.0, "sov": 0.0}
        while (elapsed := time.monotonic() - start) < seconds:
            for key, r, mk in (("main", rate, make), ("sov", SOVEREIGN_RATE, self._sovereign)):
                if elapsed >= nxt[key]:
                    t = asyncio.create_task(self.one(session, mk()))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    nxt[key] = elapsed + self.rng.expovariate(r)
            live.update(self.progress(name, elapsed, seconds))
            await asyncio.sleep(max(0.0, min(nxt.values()) - (time.monotonic() - start)))
        while tasks:
            live.update(self.progress(name, time.monotonic() - start, seconds, draining=True))
            await asyncio.wait(tasks, timeout=0.25)

    def progress(self, name: str, elapsed: float, seconds: float,
                 draining: bool = False) -> Table:
        st = self.stats
        t = Table.grid(padding=(0, 2))
        state = "draining" if draining else f"{min(elapsed, seconds):4.1f}/{seconds:.0f} s"
        t.add_row(f"[bold]{name}[/]", state, f"sent {st.sent}", f"done {st.done}",
                  f"errors {sum(st.errors.values())}", f"in flight {st.sent - st.done}")
        return t


def _pct(xs: list[float], q: float) -> float | None:
    return nearest_rank(sorted(xs), q) if xs else None


async def _records(w: Workload, gateway: Gateway) -> list[dict[str, Any]]:
    """The gateway's own ledger records of every answered request."""
    out = []
    for did in w.stats.decisions:
        rec = await gateway.ledger.lookup(did) if did else None
        if rec is not None:
            out.append(rec)
    return out


async def report(w: Workload, gateway: Gateway) -> dict[str, Any]:
    """Print the closing tables; return the numbers (for tests)."""
    st = w.stats
    out = Console(width=max(100, Console().width))
    records = await _records(w, gateway)
    kind_of = {s.name: s.kind for s in w.config.substrates}
    subs = Table(title="Requests per substrate")
    for col in ("substrate", "kind", "region", "jurisdiction", "capacity", "requests"):
        subs.add_column(col)
    for s in w.config.substrates:
        subs.add_row(s.name, s.kind, s.region, s.jurisdiction, s.capacity_class,
                     str(st.per_substrate.get(s.name, 0)))
    out.print(subs)
    per_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # n, usd, tokens
    for rec in records:
        picked = rec.get("picked") or {}
        kind = kind_of.get(picked.get("substrate", ""), "?")
        o = rec.get("outcome") or {}
        k = per_kind[kind]
        k[0] += 1
        k[1] += o.get("cost_usd") or 0.0
        k[2] += (o.get("prompt_tokens") or 0) + (o.get("completion_tokens") or 0)
    kinds = Table(title="Requests and spend per substrate kind (from the ledger)")
    for col in ("kind", "requests", "spend USD", "tokens", "USD per 1M tokens"):
        kinds.add_column(col)
    for kind in sorted({s.kind for s in w.config.substrates}):
        n, usd, tok = per_kind.get(kind, [0.0, 0.0, 0.0])
        kinds.add_row(kind, f"{n:.0f}", f"{usd:.6f}", f"{tok:.0f}",
                      f"{usd / tok * 1e6:.3f}" if tok else "-")
    out.print(kinds)
    classes = Table(title="Per workload class (TTFT measured at the client)")
    for col in ("class", "requests", "TTFT p50 ms", "TTFT p99 ms", "errors"):
        classes.add_column(col)
    for cls, n in sorted(st.per_class.items()):
        p50, p99 = _pct(st.ttft[cls], 50), _pct(st.ttft[cls], 99)
        classes.add_row(cls, str(n), f"{p50 * 1e3:.0f}" if p50 is not None else "-",
                        f"{p99 * 1e3:.0f}" if p99 is not None else "-",
                        str(st.errors_by_class.get(cls, 0)))
    out.print(classes)
    reasons: Counter[str] = Counter()
    for m in gateway.metrics.spillovers.collect():
        for smp in m.samples:
            if smp.name.endswith("_total"):
                reasons[smp.labels.get("reason", "?")] += int(smp.value)
    spilled = [r for r in records if r.get("spillover")]
    table = Table(title="Spillovers by reason (every placement outside the preferred set)")
    for col in ("reason", "placements", "answered requests that spilled"):
        table.add_column(col)
    answered = Counter((r["spillover"].get("kind") or "?") for r in spilled)
    for reason, n in reasons.most_common():
        table.add_row(reason, str(n), str(answered.get(reason, 0)))
    out.print(table)
    out.print(f"spillovers recorded: {sum(reasons.values())}   "
              f"sovereignty violations: {st.violations}")
    for reason, n in st.errors.most_common(6):
        out.print(f"  error: {reason} x{n}")
    example = max(spilled, key=lambda r: (r["spillover"].get("kind") == "outage",
                                           r["outcome"].get("attempts", 1)), default=None)
    if example is not None:
        out.print("[bold]One decision record, in full[/] (a spillover):")
        out.print_json(data=example)
    served = sorted(k for k, v in per_kind.items() if v[0] > 0)
    all_kinds = sorted({s.kind for s in w.config.substrates})
    out.print(f"substrate kinds serving: {', '.join(served)} "
              f"({len(set(served) & set(all_kinds))} of {len(all_kinds)})")
    out.print("spillover reasons: " + (", ".join(f"{k} {v}" for k, v in reasons.most_common())
                                       or "none"))
    return {"kinds_served": served, "reasons": dict(reasons), "violations": st.violations,
            "per_kind": {k: tuple(v) for k, v in per_kind.items()}}


def _start_emulator(
    config: FleetConfig, tmp: Path, time_scale: float, name: str = "emulator"
) -> subprocess.Popen[bytes]:
    path = tmp / ("fleet.yaml" if name == "emulator" else f"fleet-{name}.yaml")
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True,
                                                     exclude_none=True)))
    with (tmp / f"{name}.log").open("wb") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-m", "inferplane.cli", "emulate", "--config", str(path),
             "--time-scale", str(time_scale)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )


def _split(config: FleetConfig, substrate: str) -> tuple[FleetConfig, FleetConfig | None]:
    """The fleet without ``substrate``, and ``substrate`` alone (None when absent or alone)."""
    names = [s.name for s in config.substrates]
    if substrate not in names or len(names) < 2:
        return config, None
    rest = config.model_copy(
        update={"substrates": [s for s in config.substrates if s.name != substrate]})
    alone = config.model_copy(  # what the emulator reads: its substrates, nothing else
        update={"substrates": [s for s in config.substrates if s.name == substrate],
                "mix": [], "model_aliases": []})
    return rest, alone


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


#: (name, share of the duration, rate multiplier, what it shows)
PHASES: tuple[tuple[str, float, float, str], ...] = (
    ("steady", 0.22, 1.0, "the fleet's mix: chat, agent steps, long context, embeddings, batch"),
    ("surge", 0.18, 4.0, "EU chat past the reservations' committed concurrency"),
    ("long context", 0.12, 0.4, "prompts beyond every GPU pool's context, no class header"),
    ("agent steps", 0.12, 1.0, "agent loop steps"),
    ("provider 429s", 0.14, 1.0, "a hosted-only class; the provider's quota is below its "
                                 "declared one"),
    ("regional outage", 0.22, 1.0, f"zone of {OUTAGE_SUBSTRATE} down: its emulator is killed"),
)


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
    rest, zone = _split(config, OUTAGE_SUBSTRATE)
    emu = _start_emulator(rest, tmp, time_scale)
    emus = [emu]
    if zone is not None:
        emus.append(_start_emulator(zone, tmp, time_scale, "emulator-zone"))
    runner = None
    try:
        for proc, part, name in zip(emus, (rest, zone), ("emulator", "emulator-zone"),
                                    strict=False):
            assert part is not None
            urls = [e.url for s in part.substrates for e in s.endpoints]
            await _wait_ready(urls, proc, tmp / f"{name}.log")
        runner = await serve(gateway, "127.0.0.1", config.gateway.port)
        base = f"http://127.0.0.1:{config.gateway.port}"
        console.print(f"gateway on {base}; emulator pid {emu.pid}"
                      + (f", {OUTAGE_SUBSTRATE} emulator pid {emus[1].pid}" if zone else ""))
        w = Workload(config, keys, base, rate, seed)
        makers: dict[str, Callable[[], Request]] = {
            "steady": w._mixed, "surge": w._surge, "long context": w._long,
            "agent steps": w._agent, "provider 429s": w._hosted, "regional outage": w._eu,
        }
        models = set(gateway.fleet.models)
        skip = {"provider 429s"} if "llama-3.1-70b" not in models or not any(
            c.name == HOSTED_CLASS for c in config.classes) else set()
        if zone is None:
            skip.add("regional outage")
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for i, (name, share, mult, what) in enumerate(PHASES, 1):
                if name in skip:
                    continue
                seconds = share * duration
                console.print(f"[bold]phase {i}: {name}[/] ({seconds:.0f} s, "
                              f"~{rate * mult:g} req/s): {what}")
                if name == "regional outage":
                    _stop(emus[1])
                    console.print(f"  killed the {OUTAGE_SUBSTRATE} emulator (pid {emus[1].pid})")
                before = gateway_spillovers(gateway)
                with Live(w.progress(name, 0, seconds), console=console,
                          refresh_per_second=4, transient=True) as live:
                    await w.phase(session, name, seconds, rate * mult, makers[name], live)
                after = gateway_spillovers(gateway)
                moved = {k: v - before.get(k, 0) for k, v in after.items()
                         if v > before.get(k, 0)}
                console.print(f"  done: {w.stats.done} requests so far, "
                              f"{sum(w.stats.errors.values())} errors; spillovers this phase: "
                              + (", ".join(f"{k} {v}" for k, v in sorted(moved.items()))
                                 or "none"))
        await report(w, gateway)
        return 0 if w.stats.violations == 0 else 1
    finally:
        try:
            if runner is not None:
                await runner.cleanup()
        finally:  # even when the clean-up is cancelled (a second Ctrl-C) or fails
            for proc in emus:
                _stop(proc)


def gateway_spillovers(gateway: Gateway) -> dict[str, int]:
    """Spillovers counted so far, by reason (the gateway's metric)."""
    out: Counter[str] = Counter()
    for m in gateway.metrics.spillovers.collect():
        for smp in m.samples:
            if smp.name.endswith("_total"):
                out[smp.labels.get("reason", "?")] += int(smp.value)
    return dict(out)
