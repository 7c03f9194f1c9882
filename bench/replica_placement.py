"""Two gateway replicas behind round-robin client distribution, in front of emulated engines
with prefix caches: what does sharing placement state (``admission.shared_placement``: session
affinity and the learned prefix index, `docs/shared-state.md`) buy, against each replica
placing from its own picks?

Everything is a real process on loopback: a private ``redis-server --save ''``, the emulated
engines (`inferplane emulate`, no KV events: the learned index is what places prefixes), two
`inferplane serve` replicas with ``admission.store: redis``, and this script's clients. The
workload is prefix-heavy: ``--sessions`` conversations run at once, each ``--turns`` turns;
every prompt is one of four shared system prompts + the conversation so far (earlier prompts and
answers) + a new user message, sent with ``x-session-id``, streamed. Requests go to the two
replicas in strict alternation (one global round-robin counter), so consecutive turns of a
conversation usually land on different replicas.

Modes, fresh processes each (Redis, engines with empty caches, gateways), alternated over
``--repeats`` so that both see the same machine:

- ``one``: a single replica takes every request (the reference: one process sees every pick);
- ``off``: ``shared_placement: false`` (each replica learns only its own picks);
- ``on``: ``shared_placement: true``;
- ``rendezvous``: ``shared_placement: false`` and ``prefix-affinity``'s ``rendezvous_weight: 1``
  (new prefixes placed identically by both replicas without talking: rendezvous hashing of the
  session over the candidates).

Reported per run: the prefix hit rate (Σ cached prompt tokens ÷ Σ prompt tokens, from the
answers' usage, and the engines' own prefix-cache counters), TTFT P50/P90 at the client, errors,
and the Redis commands per request (``INFO commandstats``: what the sharing costs in round
trips).

    .venv/bin/python bench/replica_placement.py --sessions 24 --turns 6 --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from inferplane.tokenization import VOCABULARY  # noqa: E402
from tests.builders import endpoint, key_hash, model, pool_fleet, to_yaml  # noqa: E402
from tests.support.procs import Proc, free_port  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

KEY = "sk-replica-placement"
ADMIN_KEY = "sk-replica-placement-admin"  # reads /v1/fleet/health (gateway.metrics.api_keys)
_COUNTER = re.compile(rb"^vllm:prefix_cache_(queries|hits)_total\{[^}]*\} ([0-9.eE+-]+)$", re.M)


def fleet_yaml(ports: list[int], redis_url: str, *, shared: bool, hardware: str,
               blocks: int, rendezvous: float = 0.0) -> str:
    return to_yaml(pool_fleet(
        gateway={"scrape_interval_s": 0.05, "token_estimate": "words", "seed": 1,
                 "metrics": {"api_keys": [key_hash(ADMIN_KEY)]}},
        admission={"store": "redis", "redis_url": redis_url, "redis_prefix": "rp:",
                   "shared_placement": shared,
                   "queue": {"default_deadline_ms": 120000, "max_waiting": 4096}},
        substrate={"hardware": hardware, "cost": {"hourly_usd": 3.0}},
        endpoints=[endpoint(f"e{i}", p, models=[model("llama-3.1-8b", None, 32768)],
                            emulation={"num_gpu_blocks": blocks})
                   for i, p in enumerate(ports)],
        key=KEY,
        plugins=[{"type": "prefix-affinity", "parameters": {"rendezvous_weight": rendezvous}}],
    ))


@dataclass
class Run:
    mode: str
    repeat: int
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    engine_queries: float = 0.0
    engine_hits: float = 0.0
    ttft_p50_ms: float = 0.0
    ttft_p90_ms: float = 0.0
    wall_s: float = 0.0
    redis_calls: dict[str, int] = field(default_factory=dict)
    # per replica: endpoint → its latency correction (median observed ÷ predicted TTFT)
    corrections: dict[str, dict[str, float]] = field(default_factory=dict)
    moves: int = 0  # turns placed on another endpoint than the conversation's previous turn
    ttfts: list[float] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def engine_hit_rate(self) -> float:
        return self.engine_hits / self.engine_queries if self.engine_queries else 0.0


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCABULARY) for _ in range(n))


async def _stream(s: aiohttp.ClientSession, url: str, prompt: str, sid: str,
                  max_tokens: int) -> tuple[float, str, int, int, str]:
    """(TTFT s, answer text, prompt tokens, cached tokens, endpoint) of one streamed
    completion."""
    body = {"model": "llama-3.1-8b", "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {KEY}", "x-session-id": sid}
    t0 = time.perf_counter()
    ttft: float | None = None
    text: list[str] = []
    usage: dict[str, object] = {}
    async with s.post(url, json=body, headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {(await r.text())[:200]}")
        endpoint = r.headers.get("x-inferplane-endpoint", "")
        async for line in r.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = orjson.loads(line[6:])
            for c in chunk.get("choices") or ():
                if c.get("text"):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(c["text"])
            if chunk.get("usage"):
                usage = chunk["usage"]
    details = usage.get("prompt_tokens_details") or {}
    assert isinstance(details, dict)
    return (ttft if ttft is not None else time.perf_counter() - t0, "".join(text),
            int(usage.get("prompt_tokens", 0)),  # type: ignore[call-overload]
            int(details.get("cached_tokens", 0)), endpoint)


async def _engine_counters(s: aiohttp.ClientSession, ports: list[int]) -> tuple[float, float]:
    q = h = 0.0
    for p in ports:
        async with s.get(f"http://127.0.0.1:{p}/metrics") as r:
            body = await r.read()
        for kind, v in _COUNTER.findall(body):
            if kind == b"queries":
                q += float(v)
            else:
                h += float(v)
    return q, h


async def drive(run: Run, urls: list[str], ports: list[int], a: argparse.Namespace) -> None:
    rr = itertools.count()
    systems = [words(random.Random(1000 + i), a.system_words) for i in range(4)]

    async def session(s: aiohttp.ClientSession, k: int) -> None:
        rng = random.Random(k)
        history = systems[k % len(systems)]
        last: str | None = None
        for _ in range(a.turns):
            prompt = f"{history} {words(rng, a.turn_words)}"
            url = urls[next(rr) % len(urls)]
            run.requests += 1
            try:
                ttft, answer, pt, ct, ep = await _stream(s, url, prompt, f"s{k}", a.max_tokens)
            except Exception as exc:  # counted, the conversation goes on
                run.errors += 1
                print(f"  error: {exc}", file=sys.stderr)
                continue
            run.ttfts.append(ttft)
            run.moves += last is not None and ep != last
            last = ep
            run.prompt_tokens += pt
            run.cached_tokens += ct
            history = f"{prompt} {answer.strip()}"

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        q0, h0 = await _engine_counters(s, ports)
        t0 = time.perf_counter()
        await asyncio.gather(*(session(s, k) for k in range(a.sessions)))
        run.wall_s = time.perf_counter() - t0
        q1, h1 = await _engine_counters(s, ports)
        for name, url in zip("AB", dict.fromkeys(urls), strict=False):
            base = url.removesuffix("/v1/completions")
            async with s.get(f"{base}/v1/fleet/health",
                             headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
                health = await r.json()
            run.corrections[name] = {e["endpoint"]: e["ttft_correction"]
                                     for e in health["endpoints"]
                                     if e.get("ttft_correction") is not None}
    run.engine_queries, run.engine_hits = q1 - q0, h1 - h0
    xs = sorted(run.ttfts)
    if xs:
        run.ttft_p50_ms = 1000 * xs[min(len(xs) - 1, round(0.5 * (len(xs) - 1)))]
        run.ttft_p90_ms = 1000 * xs[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))]


def one_run(tmp: Path, mode: str, repeat: int, a: argparse.Namespace) -> Run:
    run = Run(mode, repeat)
    d = tmp / f"{mode}-{repeat}"
    d.mkdir(parents=True)
    srv = RedisServer(d)
    ports = [free_port() for _ in range(a.engines)]
    cfg = d / "fleet.yaml"
    cfg.write_text(fleet_yaml(ports, srv.url, shared=mode == "on", hardware=a.hardware,
                              blocks=a.blocks, rendezvous=1.0 if mode == "rendezvous" else 0.0))
    procs: list[Proc] = []
    try:
        emu = Proc(["-m", "inferplane.cli", "emulate", "--config", str(cfg),
                    "--time-scale", str(a.time_scale)], d / "emulate.log")
        procs.append(emu)
        for p in ports:
            emu.wait_http(f"http://127.0.0.1:{p}/health")
        urls = []
        for name in ("A",) if mode == "one" else ("A", "B"):
            port = free_port()
            gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg), "--port", str(port)],
                      d / f"gw-{name}.log")
            procs.append(gw)
            urls.append(f"http://127.0.0.1:{port}")
        for u in urls:
            procs[0].wait_http(f"{u}/ready")
        client = srv.client()
        client.config_resetstat()
        asyncio.run(drive(run, [f"{u}/v1/completions" for u in urls], ports, a))
        stats = client.info("commandstats")
        run.redis_calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()
                           if isinstance(v, dict)}
    finally:
        for proc in reversed(procs):
            proc.stop()
        srv.stop()
    return run


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=24)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--engines", type=int, default=4)
    ap.add_argument("--system-words", type=int, default=1500)
    ap.add_argument("--turn-words", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--hardware", default="l4")
    ap.add_argument("--blocks", type=int, default=8192, help="KV blocks per engine")
    ap.add_argument("--time-scale", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", default="off,on,rendezvous")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--tmp", type=Path, default=Path("/tmp/bench-replica-placement"))
    a = ap.parse_args()
    import shutil

    shutil.rmtree(a.tmp, ignore_errors=True)
    a.tmp.mkdir(parents=True)
    before = _uptime()
    runs: list[Run] = []
    for r in range(a.repeats):
        for mode in a.modes.split(","):
            run = one_run(a.tmp, mode, r, a)
            runs.append(run)
            n = max(1, run.requests)
            print(f"{mode} #{r}: {run.requests} requests, {run.errors} errors, hit "
                  f"{run.hit_rate:.3f} (engines {run.engine_hit_rate:.3f}), TTFT p50 "
                  f"{run.ttft_p50_ms:.0f} ms p90 {run.ttft_p90_ms:.0f} ms, "
                  f"{run.wall_s:.1f} s, {run.moves} moves; redis/request: "
                  + ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(run.redis_calls.items())),
                  flush=True)
    after = _uptime()
    gaps = []
    for done in runs:
        a_, b_ = done.corrections.get("A", {}), done.corrections.get("B", {})
        for e in sorted(set(a_) & set(b_)):
            gaps.append(abs(a_[e] - b_[e]) / ((a_[e] + b_[e]) / 2))
            print(f"{done.mode} #{done.repeat} {e}: latency correction A {a_[e]:.3f} "
                  f"B {b_[e]:.3f}")
    if gaps:
        print(f"latency corrections, A vs B per endpoint: median gap {statistics.median(gaps):.1%}"
              f", largest {max(gaps):.1%} ({len(gaps)} pairs)")
    print(f"\nload before: {before}\nload after:  {after}\n")
    print("| shared placement | runs | requests | errors | prefix hit (usage) | prefix hit "
          "(engines) | turns moved | TTFT p50 ms | TTFT p90 ms | Redis GET / SET / PUBLISH "
          "per request |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in a.modes.split(","):
        rs = [r for r in runs if r.mode == mode]
        n = sum(r.requests for r in rs) or 1

        def med(xs: list[float]) -> float:
            return statistics.median(xs)

        calls = {k: sum(r.redis_calls.get(k, 0) for r in rs) / n for k in ("get", "set", "publish")}
        print(f"| {mode} | {len(rs)} | {sum(r.requests for r in rs)} | "
              f"{sum(r.errors for r in rs)} | {med([r.hit_rate for r in rs]):.3f} "
              f"({', '.join(f'{r.hit_rate:.3f}' for r in rs)}) | "
              f"{med([r.engine_hit_rate for r in rs]):.3f} | "
              f"{sum(r.moves for r in rs) / max(1, n - a.sessions * len(rs)):.1%} | "
              f"{med([r.ttft_p50_ms for r in rs]):.0f} | {med([r.ttft_p90_ms for r in rs]):.0f} "
              f"({', '.join(f'{r.ttft_p90_ms:.0f}' for r in rs)}) | "
              f"{calls['get']:.2f} / {calls['set']:.2f} / {calls['publish']:.2f} |")
    if a.json:
        out = [{**asdict(r), "hit_rate": r.hit_rate, "engine_hit_rate": r.engine_hit_rate}
               for r in runs]
        for o in out:
            o.pop("ttfts")
        a.json.write_text(json.dumps({"args": vars(a) | {"json": str(a.json), "tmp": str(a.tmp)},
                                      "load_before": before, "load_after": after, "runs": out},
                                     indent=2) + "\n")


if __name__ == "__main__":
    main()
