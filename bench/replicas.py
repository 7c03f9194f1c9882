"""Two gateway replicas sharing one Redis in front of emulated engines with a small
``max_concurrency``: does any engine ever run more than its limit, and what happens to the other
replica's clients when one replica is killed with -9 under load?

Everything is a real process on loopback: a private ``redis-server --save ''``, the emulated
engines (`inferplane emulate`), two `inferplane serve` replicas and this script's clients
(``--clients`` per replica, closed loop, for ``--duration`` seconds). A sampler reads every
engine's ``/metrics`` (running + waiting) and every endpoint's slot set in Redis every 10 ms.
With ``--kill-at S`` replica A gets SIGKILL at S seconds; the script then times how long the
slots A held stay in Redis (its leases, ``admission.slot_lease_s``).

    .venv/bin/python bench/replicas.py --clients 100 --duration 20 --kill-at 8 --lease 5

prints a table and, with ``--json F``, writes the numbers. `tests/test_replicas.py` runs a short
version of the same scenario with assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.builders import endpoint, model, pool_fleet, to_yaml  # noqa: E402
from tests.support.procs import Proc, free_port  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

KEY = "sk-replicas"
PREFIX = "rep:"
_GAUGE = re.compile(rb"^vllm:num_requests_(running|waiting)\{[^}]*\} ([0-9.eE+-]+)$", re.M)


def fleet_yaml(engine_ports: list[int], redis_url: str, *, max_concurrency: int,
               lease_s: float, shared_slots: bool = True) -> str:
    return to_yaml(pool_fleet(
        gateway={"scrape_interval_s": 0.05, "token_estimate": "words", "seed": 1},
        admission={"store": "redis", "redis_url": redis_url, "redis_prefix": PREFIX,
                   "slot_lease_s": lease_s, "shared_slots": shared_slots,
                   "queue": {"default_deadline_ms": 60000, "max_waiting": 4096}},
        substrate={"cost": {"hourly_usd": 3.0}},
        endpoints=[endpoint(f"e{i}", p, models=[model("llama-3.1-8b", None)],
                            max_concurrency=max_concurrency)
                   for i, p in enumerate(engine_ports)],
        key=KEY,
    ))


@dataclass
class Result:
    shared_slots: bool
    clients_per_replica: int
    duration_s: float
    max_concurrency: int
    engines: int
    lease_s: float
    ok: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    failed_after_kill: dict[str, int] = field(default_factory=dict)
    ok_after_kill: dict[str, int] = field(default_factory=dict)
    engine_max: dict[str, float] = field(default_factory=dict)  # running + waiting, sampled
    slots_max: dict[str, int] = field(default_factory=dict)  # Redis set size, sampled
    samples: int = 0
    killed_slots: int = 0  # slots replica A held in Redis when it was killed
    release_s: float | None = None  # kill → the last of those slots gone
    slots_left_at_end: int = 0
    errors: list[str] = field(default_factory=list)


async def _engine_load(s: aiohttp.ClientSession, port: int) -> float:
    async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.read()
    return sum(float(v) for _, v in _GAUGE.findall(text))


async def run_scenario(
    tmp: Path,
    *,
    clients: int = 100,
    duration_s: float = 6.0,
    kill_at_s: float | None = 3.0,
    engines: int = 3,
    max_concurrency: int = 2,
    lease_s: float = 2.0,
    time_scale: float = 4.0,
    max_tokens: int = 12,
    shared_slots: bool = True,
) -> Result:
    res = Result(shared_slots, clients, duration_s, max_concurrency, engines, lease_s)
    srv = RedisServer(tmp)
    ports = [free_port() for _ in range(engines)]
    cfg = tmp / "fleet.yaml"
    cfg.write_text(fleet_yaml(ports, srv.url, max_concurrency=max_concurrency, lease_s=lease_s,
                              shared_slots=shared_slots))
    procs: list[Proc] = []
    try:
        emu = Proc(["-m", "inferplane.cli", "emulate", "--config", str(cfg),
                    "--time-scale", str(time_scale)], tmp / "emulate.log")
        procs.append(emu)
        for p in ports:
            emu.wait_http(f"http://127.0.0.1:{p}/health")
        gws: dict[str, tuple[Proc, str]] = {}
        for name in ("A", "B"):
            port = free_port()
            gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg), "--port", str(port)],
                      tmp / f"gw-{name}.log")
            procs.append(gw)
            gws[name] = (gw, f"http://127.0.0.1:{port}")
        for gw, base in gws.values():
            gw.wait_http(f"{base}/ready")
        await _drive(res, srv, ports, gws, kill_at_s, max_tokens)
    finally:
        for p in procs:
            p.stop()
        srv.stop()
    for name, (gw, _) in gws.items():
        text = gw.log.read_text(errors="replace")
        if "Traceback" in text:
            res.errors.append(f"replica {name} logged a traceback")
    return res


async def _drive(res: Result, srv: RedisServer, ports: list[int],
                 gws: dict[str, tuple[Any, str]], kill_at_s: float | None,
                 max_tokens: int) -> None:
    r = aioredis.Redis.from_url(srv.url, decode_responses=True)
    keys = [f"{PREFIX}e:e{i}" for i in range(len(ports))]
    body = {"model": "llama-3.1-8b", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "tell me about replicas " * 4}]}
    headers = {"Authorization": f"Bearer {KEY}"}
    t0 = time.monotonic()
    # with a kill planned, the end is set at the kill (A must have answered first)
    end = t0 + res.duration_s if kill_at_s is None else float("inf")
    killed_at: float | None = None
    stop = asyncio.Event()
    for name in gws:
        res.ok[name] = res.failed[name] = 0
        res.ok_after_kill[name] = res.failed_after_kill[name] = 0

    seq = iter(range(1 << 62))

    async def client(s: aiohttp.ClientSession, name: str, base: str) -> None:
        while time.monotonic() < end:
            # every request is new (not a client retry, which a saturated fleet sheds first)
            h = {**headers, "Idempotency-Key": f"{name}-{next(seq)}"}
            if killed_at is not None and name == "A":
                return
            ok = False
            try:
                async with s.post(f"{base}/v1/chat/completions", json=body,
                                  headers=h) as resp:
                    await resp.read()
                    ok = resp.status == 200
                    if not ok and len(res.errors) < 10:
                        res.errors.append(f"{name}: {resp.status} {(await resp.text())[:200]}")
            except (TimeoutError, aiohttp.ClientError) as exc:
                if name == "A" and killed_at is not None:
                    return  # the killed replica's own clients
                if len(res.errors) < 10:
                    res.errors.append(f"{name}: {type(exc).__name__} {exc}")
            after = killed_at is not None
            if ok:
                res.ok[name] += 1
                res.ok_after_kill[name] += after
            else:
                res.failed[name] += 1
                res.failed_after_kill[name] += after

    async def sampler(s: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            loads = await asyncio.gather(*(_engine_load(s, p) for p in ports),
                                         return_exceptions=True)
            for i, v in enumerate(loads):
                if isinstance(v, float):
                    k = f"e{i}"
                    res.engine_max[k] = max(res.engine_max.get(k, 0.0), v)
            async with r.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.zcard(k)
                sizes = await pipe.execute()
            for k, n in zip(keys, sizes, strict=True):
                res.slots_max[k] = max(res.slots_max.get(k, 0), int(n))
            res.samples += 1
            await asyncio.sleep(0.01)

    timeout = aiohttp.ClientTimeout(total=90)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as s:
        smp = asyncio.create_task(sampler(s))
        tasks = [asyncio.create_task(client(s, name, base))
                 for name, (_, base) in gws.items() for _ in range(res.clients_per_replica)]
        if kill_at_s is not None:
            await asyncio.sleep(kill_at_s)
            while res.ok["A"] < 5 and time.monotonic() < t0 + 60:  # a loaded machine starts slowly
                await asyncio.sleep(0.1)
            end = time.monotonic() + res.duration_s - kill_at_s
            gw_a = gws["A"][0]
            mine = f"{gw_a.p.pid}-"  # slot ids start with the holder's pid
            for _ in range(200):  # kill A while it holds a slot (B may hold all of them)
                async with r.pipeline(transaction=True) as pipe:
                    for k in keys:
                        pipe.zrange(k, 0, -1)
                    before = await pipe.execute()
                if any(m.startswith(mine) for ms in before for m in ms):
                    break
                await asyncio.sleep(0.005)
            gw_a.p.kill()  # SIGKILL
            killed_at = time.monotonic()
            gw_a.p.wait(5)
            a_slots = {(k, m) for k, ms in zip(keys, before, strict=True) for m in ms
                       if m.startswith(mine)}
            res.killed_slots = len(a_slots)
            while a_slots and time.monotonic() < killed_at + res.lease_s * 3:
                await asyncio.sleep(0.05)
                for k, m in list(a_slots):
                    if await r.zscore(k, m) is None:
                        a_slots.discard((k, m))
            res.release_s = time.monotonic() - killed_at if not a_slots else None
        await asyncio.gather(*tasks)
        await asyncio.sleep(0.3)  # B's releases go out after its answers
        stop.set()
        await smp
    res.slots_left_at_end = sum([int(await r.zcard(k)) for k in keys])
    await r.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=100, help="closed-loop clients per replica")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--kill-at", type=float, default=8.0, help="SIGKILL replica A (<0: never)")
    ap.add_argument("--engines", type=int, default=3)
    ap.add_argument("--max-concurrency", type=int, default=2)
    ap.add_argument("--lease", type=float, default=5.0, help="admission.slot_lease_s")
    ap.add_argument("--time-scale", type=float, default=4.0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    import tempfile

    out = []
    for shared in (False, True):  # the baseline (per-process in-flight counts) first
        with tempfile.TemporaryDirectory() as d:
            res = asyncio.run(run_scenario(
                Path(d), clients=a.clients, duration_s=a.duration,
                kill_at_s=a.kill_at if a.kill_at >= 0 else None, engines=a.engines,
                max_concurrency=a.max_concurrency, lease_s=a.lease, time_scale=a.time_scale,
                shared_slots=shared,
            ))
        out.append(asdict(res))
    print("| shared slots | ok A / B | failed B (after kill) | engine max running+waiting "
          "| Redis slots max | A's slots at kill | gone after |")
    print("|---|---|---|---|---|---|---|")
    for o in out:
        rel = "-" if o["release_s"] is None or not o["killed_slots"] else f"{o['release_s']:.2f} s"
        print(f"| {o['shared_slots']} | {o['ok']['A']} / {o['ok']['B']} | "
              f"{o['failed']['B']} ({o['failed_after_kill']['B']}) | "
              f"{max(o['engine_max'].values()):g} (limit {o['max_concurrency']}) | "
              f"{max(o['slots_max'].values())} | {o['killed_slots']} | {rel} |")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
