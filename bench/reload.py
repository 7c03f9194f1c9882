"""Reloading the fleet file under load (issue 14 item 7): does a request fail, and how long
from SIGHUP until the added endpoint serves?

Everything is a real process on loopback: emulated engines e0, e1 and e2 (`inferplane emulate`),
one `inferplane serve` (``--workers N``: N processes sharing a private ``redis-server``) whose
fleet file names e0 and e1, and this script's closed-loop clients (half of the requests
streamed, each on a new connection so that every worker gets some). At ``--reload-at`` seconds
the file is replaced by one naming e1 and e2 (e0 removed, e2 added) and the gateway gets SIGHUP;
then, with ``--bad``, by an invalid file (the old fleet must keep serving).

    .venv/bin/python bench/reload.py --clients 16 --duration 6 --reload-at 2 --workers 1

prints a table and, with ``--json F``, writes the numbers. `tests/test_reload.py` runs short
versions with assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.builders import endpoint, model, pool_fleet, to_yaml  # noqa: E402
from tests.support.procs import Proc, free_port  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

KEY = "sk-reload"
APPLIED = "fleet reloaded from"
DRAINING = re.compile(r"fleet reloaded from .*; removed \[.*\] \(draining (\d+) in flight\)")
REFUSED = "fleet reload refused"


def fleet_yaml(engines: dict[str, int], redis_url: str | None = None, *,
               bad: bool = False) -> str:
    admission = {"admission": {"store": "redis", "redis_url": redis_url,
                               "redis_prefix": "reload:"}} if redis_url else {}
    return to_yaml(pool_fleet(
        gateway={"scrape_interval_s": 0.05, "token_estimate": "words", "seed": 1,
                 "metrics": {"public": True}},
        **admission,
        substrate={"cost": {"hourly_usd": 3.0}},
        endpoints=[endpoint(name, port, models=[model("llama-3.1-8b", None)],
                            max_concurrency=-1 if bad and i == len(engines) - 1 else 64)
                   for i, (name, port) in enumerate(engines.items())],
        key=KEY,
    ))


@dataclass
class Sent:
    started: float
    ended: float
    endpoint: str | None
    ok: bool
    stream: bool


@dataclass
class Result:
    workers: int
    clients: int
    duration_s: float
    requests: int = 0
    failed: int = 0
    applied_s: float | None = None  # SIGHUP → every worker logged the reload applied
    first_new_s: float | None = None  # SIGHUP → the first answer from the added endpoint began
    removed_after_apply: int = 0  # requests started after the reload that went to e0
    drained: int = 0  # requests in flight on e0 at the swap (the reload's log line, every
    # worker's); they end as every request does: ``failed`` counts those that did not (200)
    drained_seen: int = 0  # e0 requests (the client's header) that ended 200 after the SIGHUP
    # was sent: every request counted in ``drained`` is one of them if it finished on e0
    served: dict[str, int] = field(default_factory=dict)  # after the reload, by endpoint
    bad_refused_s: float | None = None
    after_bad: dict[str, int] = field(default_factory=dict)  # after the bad file, by endpoint
    refusal: str = ""  # the refusal's log lines
    metrics: dict[str, float] = field(default_factory=dict)  # without the worker label
    by_worker: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> worker -> v
    errors: list[str] = field(default_factory=list)


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def _wait_log(log: Path, needle: str, count: int, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.read_text(errors="replace").count(needle) >= count:
            return time.monotonic()
        await asyncio.sleep(0.005)
    raise TimeoutError(f"{needle!r} x{count} not in {log}")


async def run_scenario(
    tmp: Path,
    *,
    clients: int = 8,
    duration_s: float = 4.0,
    reload_at_s: float = 1.5,
    workers: int = 1,
    bad: bool = True,
    max_tokens: int = 24,
) -> Result:
    res = Result(workers, clients, duration_s)
    srv = RedisServer(tmp) if workers > 1 else None
    ports = {f"e{i}": free_port() for i in range(3)}
    engines_cfg = tmp / "engines.yaml"
    engines_cfg.write_text(fleet_yaml(ports))
    cfg = tmp / "fleet.yaml"
    url = srv.url if srv else None
    cfg.write_text(fleet_yaml({n: ports[n] for n in ("e0", "e1")}, url))
    gw_port = free_port()
    procs: list[Proc] = []
    try:
        emu = Proc(["-m", "inferplane.cli", "emulate", "--config", str(engines_cfg)],
                   tmp / "emulate.log")
        procs.append(emu)
        for p in ports.values():
            emu.wait_http(f"http://127.0.0.1:{p}/health")
        gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg), "--port", str(gw_port),
                   "--workers", str(workers)], tmp / "gw.log")
        procs.append(gw)
        base = f"http://127.0.0.1:{gw_port}"
        gw.wait_http(f"{base}/ready")
        await _wait_log(gw.log, "listening on", workers)
        await _drive(res, gw, cfg, base, ports, url, reload_at_s, bad, max_tokens)
    finally:
        for proc in procs:
            proc.stop()
        if srv is not None:
            srv.stop()
    text = (tmp / "gw.log").read_text(errors="replace")
    if "Traceback" in text:
        res.errors.append("the gateway logged a traceback")
    res.refusal = "\n".join(ln for ln in text.splitlines() if "fleet.yaml:" in ln)[:2000]
    return res


async def _drive(res: Result, gw: Proc, cfg: Path, base: str, ports: dict[str, int],
                 redis_url: str | None, reload_at_s: float, bad: bool, max_tokens: int) -> None:
    sent: list[Sent] = []
    t0 = time.monotonic()
    end = t0 + res.duration_s
    headers = {"Authorization": f"Bearer {KEY}"}
    seq = iter(range(1 << 62))

    async def client(s: aiohttp.ClientSession) -> None:
        while time.monotonic() < end:
            i = next(seq)
            stream = i % 2 == 0
            body = {"model": "llama-3.1-8b", "max_tokens": max_tokens, "stream": stream,
                    "messages": [{"role": "user", "content": f"reload {i} " * 8}]}
            started = time.monotonic()
            endpoint, ok = None, False
            try:
                async with s.post(f"{base}/v1/chat/completions", json=body,
                                  headers=headers) as resp:
                    data = await resp.read()
                    endpoint = resp.headers.get("x-inferplane-endpoint")
                    ok = resp.status == 200 and (not stream or data.rstrip().endswith(b"[DONE]")
                                                 or b"[DONE]" in data)
                    if not ok and len(res.errors) < 10:
                        res.errors.append(f"{resp.status} {data[:200]!r}")
            except (TimeoutError, aiohttp.ClientError) as exc:
                if len(res.errors) < 10:
                    res.errors.append(f"{type(exc).__name__} {exc}")
            sent.append(Sent(started, time.monotonic(), endpoint, ok, stream))

    async def reloader() -> None:
        await asyncio.sleep(reload_at_s)
        _write(cfg, fleet_yaml({n: ports[n] for n in ("e1", "e2")}, redis_url))
        hup = time.monotonic()
        gw.p.send_signal(signal.SIGHUP)
        applied = await _wait_log(gw.log, APPLIED, res.workers)
        res.applied_s = applied - hup
        if bad:
            await asyncio.sleep((end - applied) / 2)
            _write(cfg, fleet_yaml({n: ports[n] for n in ("e1", "e2")}, redis_url, bad=True))
            bad_at = time.monotonic()
            gw.p.send_signal(signal.SIGHUP)
            refused = await _wait_log(gw.log, REFUSED, res.workers)
            res.bad_refused_s = refused - bad_at
            marks.append(refused)
        marks.insert(0, applied)
        marks.insert(0, hup)

    marks: list[float] = []
    conn = aiohttp.TCPConnector(force_close=True)  # a connection per request: every worker
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=30)) as s:
        await asyncio.gather(reloader(), *(client(s) for _ in range(res.clients)))
        if bad:  # every worker's (each counts its own reloads), labelled with its worker
            async with s.get(f"{base}/metrics") as r:
                for line in (await r.text()).splitlines():
                    if line.startswith(("inferplane_config_reloads_total",
                                        "inferplane_config_last_reload_successful")):
                        name, _, value = line.rpartition(" ")
                        worker = re.search(r'worker="(\d+)",?', name)
                        if worker is not None:
                            name = name.replace(worker.group(0), "").replace("{}", "")
                        res.metrics[name] = float(value)
                        res.by_worker.setdefault(name, {})[
                            worker.group(1) if worker else ""] = float(value)
    hup, applied = marks[0], marks[1]
    refused = marks[2] if bad else float("inf")
    res.requests = len(sent)
    res.failed = sum(1 for x in sent if not x.ok)
    new = [x.started for x in sent if x.endpoint == "e2"]
    res.first_new_s = min(new) - hup if new else None
    res.removed_after_apply = sum(1 for x in sent if x.endpoint == "e0" and x.started > applied)
    res.drained = sum(int(n) for n in DRAINING.findall(gw.log.read_text(errors="replace")))
    res.drained_seen = sum(1 for x in sent if x.endpoint == "e0" and x.ok and x.ended > hup)
    for x in sent:
        if x.started > applied and x.endpoint:
            res.served[x.endpoint] = res.served.get(x.endpoint, 0) + 1
        if x.started > refused and x.endpoint:
            res.after_bad[x.endpoint] = res.after_bad.get(x.endpoint, 0) + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--reload-at", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import tempfile

    results = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as d:
            results.append(asyncio.run(run_scenario(
                Path(d), clients=args.clients, duration_s=args.duration,
                reload_at_s=args.reload_at, workers=args.workers,
            )))
    print("| run | workers | requests | failed | SIGHUP → applied (all workers) | "
          "SIGHUP → first request on e2 | to e0 after apply | "
          "in flight on e0 at the swap (gateway's log) | e0 ended 200 after SIGHUP (clients) | "
          "bad file refused |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(results):
        print(f"| {i + 1} | {r.workers} | {r.requests} | {r.failed} | "
              f"{_ms(r.applied_s)} | {_ms(r.first_new_s)} | {r.removed_after_apply} | "
              f"{r.drained} | {r.drained_seen} | {_ms(r.bad_refused_s)} |")
    for r in results:
        if r.errors:
            print("errors:", r.errors[:5])
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.0f} ms"


if __name__ == "__main__":
    main()
