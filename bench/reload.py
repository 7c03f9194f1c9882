"""Reloading the fleet file under load (issue 14 item 7): does a request fail, and how long
from SIGHUP until the added endpoint serves?

Everything is a real process on loopback: emulated engines e0, e1 and e2 (`inferplane emulate`),
one `inferplane serve` (``--workers N``: N processes sharing a private ``redis-server``) whose
fleet file names e0 and e1, and this script's closed-loop clients (half of the requests
streamed, each on a new connection so that every worker gets some). At ``--reload-at`` seconds
the file is replaced by one naming e1 and e2 (e0 removed, e2 added) and the gateway gets SIGHUP;
then by an invalid file (the old fleet must keep serving).

Each phase ends on an event as well as at its time: the SIGHUP waits until e0 and e1 have each
answered ``per_window`` requests, the bad file and the end until e1 and e2 have each answered
``per_window`` requests started after the last reload (each wait bounded by
``WINDOW_TIMEOUT_S``, which fails naming what was missing); `tests/test_reload.py` gives no
times, only the events. With ``--anchor`` (the tests' way) e0's address in the gateway's fleet
file is a pass-through gate in this process (`Gate`) that holds one streamed "anchor" request
after its first token until every worker has applied the reload: a request certainly in flight
on e0 at the swap (the client saw its first token and e0 in ``x-inferplane-endpoint``), which
must then finish there, 200. Anchors are sent one at a time until one is placed on e0, for at
most ``WINDOW_TIMEOUT_S``. The gate is an extra hop in this process for everything sent to e0
(requests, scrapes, health probes), so runs with ``--anchor`` are not comparable in timings with
runs without it.

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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from inferplane.epp.protocol import ENDPOINT_HEADER  # noqa: E402
from tests.builders import endpoint, key_hash, model, pool_fleet, to_yaml  # noqa: E402
from tests.support.procs import Proc, free_port  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

KEY = "sk-reload"
ADMIN_KEY = "sk-reload-admin"  # reads GET /v1/fleet/health (gateway.metrics.api_keys)
APPLIED = "fleet reloaded from"
DRAINING = re.compile(r"fleet reloaded from .*; removed \[.*\] \(draining (\d+) in flight\)")
REFUSED = "fleet reload refused"
ANCHOR = "reload anchor"  # the anchor's prompt begins with this (`Gate` holds such a stream)
WINDOW_TIMEOUT_S = 60.0  # the longest wait for a phase's event before failing
# the anchor's own limit: it stays open over the warm-up and the reload (the others have 30 s)
ANCHOR_TIMEOUT = aiohttp.ClientTimeout(total=3 * WINDOW_TIMEOUT_S)
_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}
# aiohttp's client hands the gate a decoded body: its encoding is not passed on either
_HOP_ANSWER = _HOP | {"content-encoding"}


class Gate:
    """An HTTP pass-through to e0's emulated engine (every route: generation, scrapes, health)
    that holds the stream of an anchor request (its prompt begins with :data:`ANCHOR`) after
    the event carrying its first token, until :attr:`opened` is set: the gateway has then had
    that request in flight on e0 since before the SIGHUP, and it cannot end before the gate
    opens, whatever the load on the machine. It knows server-sent events only as blocks of one
    ``data:`` line ended by ``\n\n`` (what the emulator sends): with another framing it passes
    the anchor on unheld, and the warm-up's wait for a held anchor fails, naming it."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.opened = asyncio.Event()
        self.holding = 0  # anchor streams held (their first token sent on) until it opens
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    async def start(self, port: int) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()

    async def stop(self) -> None:
        self.opened.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with self._session.request(request.method, self.upstream + request.path_qs,
                                         data=body, headers=headers) as up:
            resp = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in _HOP_ANSWER})
            try:
                await resp.prepare(request)
                hold = ANCHOR.encode() in body and up.status == 200
                buf = b""
                async for chunk in up.content.iter_any():
                    if not hold:
                        await resp.write(chunk)
                        continue
                    buf += chunk
                    while hold and (end := buf.find(b"\n\n")) >= 0:
                        event, buf = buf[:end + 2], buf[end + 2:]
                        await resp.write(event)
                        if _has_token(event):
                            hold = False
                            self.holding += 1
                            await self.opened.wait()
                            self.holding -= 1
                    if not hold and buf:
                        await resp.write(buf)
                        buf = b""
                if buf:
                    await resp.write(buf)
                await resp.write_eof()
            except ConnectionResetError:  # the gateway went away: stopped at the end, or it
                pass  # gave up on a request (a probe, a scrape) before its head, slow under load
            return resp


def _has_token(event: bytes) -> bool:
    """Whether one server-sent event of a streamed answer carries generated text."""
    line = event.strip()
    if not line.startswith(b"data: {"):
        return False
    choices = json.loads(line[len(b"data: "):]).get("choices") or [{}]
    c = choices[0]
    return bool((c.get("delta") or {}).get("content") or c.get("text"))


def fleet_yaml(engines: dict[str, int], redis_url: str | None = None, *,
               bad: bool = False) -> str:
    # --workers > 1 (with Redis) refuses a batch lane in memory: run with none (so this arm,
    # unlike a --workers 1 run, has no idle batch lane)
    admission = {"admission": {"store": "redis", "redis_url": redis_url,
                               "redis_prefix": "reload:"},
                 "batch": {"enabled": False}} if redis_url else {}
    return to_yaml(pool_fleet(
        gateway={"scrape_interval_s": 0.05, "token_estimate": "words", "seed": 1,
                 "metrics": {"public": True, "api_keys": [key_hash(ADMIN_KEY)]}},
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
    duration_s: float = 0.0  # the clients' start → the last one's end (the run's length)
    requests: int = 0
    failed: int = 0
    applied_s: float | None = None  # SIGHUP → every worker logged the reload applied
    first_new_s: float | None = None  # SIGHUP → the first answer from the added endpoint began
    removed_after_apply: int = 0  # requests started after the reload that went to e0
    drained: int = 0  # requests in flight on e0 at the swap (the reload's log line, every
    # worker's); they end as every request does: ``failed`` counts those that did not (200)
    drained_seen: int = 0  # e0 requests (the client's header) that ended 200 after the SIGHUP
    # was sent: every request counted in ``drained`` is one of them if it finished on e0
    anchor_tries: int = 0  # anchors sent until one was placed on e0 (0: no anchor)
    anchor_ok: bool = False  # that one ended 200 after every worker applied the reload (the
    # gate held it on e0 until then, so over the swap; it is also one of ``drained_seen``)
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
    duration_s: float = 0.0,
    reload_at_s: float = 0.0,
    workers: int = 1,
    bad: bool = True,
    max_tokens: int = 24,
    per_window: int = 8,
    anchor: bool = False,
) -> Result:
    """One run; ``duration_s`` and ``reload_at_s`` are only lower bounds on the phases' times
    (the tests give none): each phase also waits for its event (the module's docstring).
    ``Result.duration_s`` is the time the clients actually ran."""
    res = Result(workers, clients)
    srv = RedisServer(tmp) if workers > 1 else None
    ports = {f"e{i}": free_port() for i in range(3)}
    engines_cfg = tmp / "engines.yaml"
    engines_cfg.write_text(fleet_yaml(ports))
    cfg = tmp / "fleet.yaml"
    url = srv.url if srv else None
    gate = Gate(f"http://127.0.0.1:{ports['e0']}") if anchor else None
    first = {"e0": free_port() if gate else ports["e0"], "e1": ports["e1"]}
    cfg.write_text(fleet_yaml(first, url))
    gw_port = free_port()
    procs: list[Proc] = []
    try:
        if gate is not None:
            await gate.start(first["e0"])
        emu = Proc(["-m", "inferplane.cli", "emulate", "--config", str(engines_cfg)],
                   tmp / "emulate.log")
        procs.append(emu)
        for p in ports.values():
            emu.wait_http(f"http://127.0.0.1:{p}/health")
        gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg), "--port", str(gw_port),
                   "--workers", str(workers)], tmp / "gw.log")
        procs.append(gw)
        base = f"http://127.0.0.1:{gw_port}"
        # in a thread: the gateway probes e0 through the gate, which runs on this loop
        await asyncio.to_thread(gw.wait_http, f"{base}/ready")
        await _wait_log(gw.log, "listening on", workers)
        await _drive(res, gw, cfg, base, ports, url, duration_s, reload_at_s, bad, max_tokens,
                     per_window, gate)
    finally:
        for proc in procs:
            proc.stop()
        if gate is not None:
            await gate.stop()
        if srv is not None:
            srv.stop()
    text = (tmp / "gw.log").read_text(errors="replace")
    if "Traceback" in text:
        res.errors.append("the gateway logged a traceback")
    res.refusal = "\n".join(ln for ln in text.splitlines() if "fleet.yaml:" in ln)[:2000]
    return res


async def _drive(res: Result, gw: Proc, cfg: Path, base: str, ports: dict[str, int],
                 redis_url: str | None, duration_s: float, reload_at_s: float, bad: bool,
                 max_tokens: int, per_window: int, gate: Gate | None) -> None:
    sent: list[Sent] = []
    t0 = time.monotonic()
    end = t0 + duration_s
    headers = {"Authorization": f"Bearer {KEY}"}
    seq = iter(range(1 << 62))
    stop = asyncio.Event()
    anchored = asyncio.Event()

    def body(i: int, stream: bool, prompt: str = "reload") -> dict[str, object]:
        return {"model": "llama-3.1-8b", "max_tokens": max_tokens, "stream": stream,
                "messages": [{"role": "user", "content": f"{prompt} {i} " * 8}]}

    def check(resp: aiohttp.ClientResponse, data: bytes, stream: bool) -> bool:
        ok = resp.status == 200 and (not stream or data.rstrip().endswith(b"[DONE]")
                                     or b"[DONE]" in data)
        if not ok and len(res.errors) < 10:
            res.errors.append(f"{resp.status} {data[:200]!r}")
        return ok

    def failed(exc: Exception) -> None:
        if len(res.errors) < 10:
            res.errors.append(f"{type(exc).__name__} {exc}")

    async def client(s: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            i = next(seq)
            stream = i % 2 == 0
            started = time.monotonic()
            endpoint, ok = None, False
            try:
                async with s.post(f"{base}/v1/chat/completions", json=body(i, stream),
                                  headers=headers) as resp:
                    data = await resp.read()
                    endpoint = resp.headers.get(ENDPOINT_HEADER)
                    ok = check(resp, data, stream)
            except (TimeoutError, aiohttp.ClientError) as exc:
                failed(exc)
            sent.append(Sent(started, time.monotonic(), endpoint, ok, stream))

    async def anchor(s: aiohttp.ClientSession) -> None:
        """Streamed anchors, one at a time, until one is placed on e0 (its first event seen,
        e0 in its header), for at most ``WINDOW_TIMEOUT_S``; that one stays open, held at e0's
        gate, until the reload is applied, and is then read to its end."""
        deadline = time.monotonic() + WINDOW_TIMEOUT_S
        k = 0
        while time.monotonic() < deadline:
            k += 1
            started = time.monotonic()
            endpoint, ok, on_e0 = None, False, False
            try:
                async with s.post(f"{base}/v1/chat/completions", json=body(k, True, ANCHOR),
                                  headers=headers, timeout=ANCHOR_TIMEOUT) as resp:
                    endpoint = resp.headers.get(ENDPOINT_HEADER)
                    data = b""
                    while resp.status == 200:  # up to its first event carrying a choice
                        line = await resp.content.readline()
                        data += line
                        if not line or line.startswith(b"data: {"):
                            on_e0 = endpoint == "e0" and bool(line)
                            break
                    if on_e0:
                        res.anchor_tries = k
                        anchored.set()
                    data += await resp.read()
                    ok = check(resp, data, True)
            except (TimeoutError, aiohttp.ClientError) as exc:
                failed(exc)
            ended = time.monotonic()
            sent.append(Sent(started, ended, endpoint, ok, True))
            if on_e0:  # marks[1]: every worker applied the reload (then the gate opened)
                res.anchor_ok = ok and len(marks) > 1 and ended > marks[1]
                return
            await asyncio.sleep(0.02)  # e0 not preferred just now: not a busy loop
        raise AssertionError(f"none of {k} anchors was placed on e0 within "
                             f"{WINDOW_TIMEOUT_S:.0f} s (served since the start: "
                             f"{_count(sent, t0)}; errors: {res.errors})")

    async def until(cond: Callable[[], bool], what: str) -> float:
        deadline = time.monotonic() + WINDOW_TIMEOUT_S
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {WINDOW_TIMEOUT_S:.0f} s (served "
                                     f"since the start: {_count(sent, t0)}; errors: "
                                     f"{res.errors})")
            await asyncio.sleep(0.005)
        return time.monotonic()

    def served(since: float, names: tuple[str, ...], at: float) -> Callable[[], bool]:
        got: dict[str, int] = {}
        seen = 0  # ``sent`` only grows: each check counts what was added since the last one

        def cond() -> bool:
            nonlocal seen
            for x in sent[seen:]:
                if x.ok and x.started > since and x.endpoint:
                    got[x.endpoint] = got.get(x.endpoint, 0) + 1
            seen = len(sent)
            return time.monotonic() >= at and all(got.get(n, 0) >= per_window for n in names)
        return cond

    async def reloader() -> None:
        try:
            warm = served(t0, ("e0", "e1"), t0 + reload_at_s)
            if gate is not None:
                await until(lambda: warm() and anchored.is_set() and gate.holding >= 1,
                            f"an anchor held on e0 and {per_window} answers from each of e0, e1")
            else:
                await until(warm, f"{per_window} answers from each of e0, e1")
            _write(cfg, fleet_yaml({n: ports[n] for n in ("e1", "e2")}, redis_url))
            hup = time.monotonic()
            marks.append(hup)
            gw.p.send_signal(signal.SIGHUP)
            applied = await _wait_log(gw.log, APPLIED, res.workers)
            marks.append(applied)
            res.applied_s = applied - hup
            if gate is not None:
                gate.opened.set()  # every worker swapped: the anchor may finish
            if bad:
                await until(served(applied, ("e1", "e2"), applied + (end - applied) / 2),
                            f"{per_window} answers from each of e1, e2 after the reload")
                _write(cfg, fleet_yaml({n: ports[n] for n in ("e1", "e2")}, redis_url,
                                       bad=True))
                bad_at = time.monotonic()
                gw.p.send_signal(signal.SIGHUP)
                refused = await _wait_log(gw.log, REFUSED, res.workers)
                res.bad_refused_s = refused - bad_at
                marks.append(refused)
            await until(served(marks[-1], ("e1", "e2"), end),
                        f"{per_window} answers from each of e1, e2 after the last reload")
        finally:
            stop.set()
            if gate is not None:
                gate.opened.set()

    marks: list[float] = []  # SIGHUP, applied, and with ``bad`` the bad file refused
    conn = aiohttp.TCPConnector(force_close=True)  # a connection per request: every worker
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=30)) as s:
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(reloader())
                if gate is not None:
                    tasks.create_task(anchor(s))
                for _ in range(res.clients):
                    tasks.create_task(client(s))
        except BaseExceptionGroup as group:  # a phase's event did not come: say which
            raise group.exceptions[0] from None
        res.duration_s = time.monotonic() - t0
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


def _count(sent: list[Sent], since: float) -> dict[str, int]:
    """Requests started after ``since`` that ended 200, by the endpoint that answered."""
    out: dict[str, int] = {}
    for x in sent:
        if x.ok and x.started > since and x.endpoint:
            out[x.endpoint] = out.get(x.endpoint, 0) + 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--reload-at", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--per-window", type=int, default=8,
                    help="answers from each endpoint a phase also waits for")
    ap.add_argument("--anchor", action="store_true",
                    help="hold an anchor request on e0 over the swap (e0 behind a gate)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import tempfile

    results = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as d:
            results.append(asyncio.run(run_scenario(
                Path(d), clients=args.clients, duration_s=args.duration,
                reload_at_s=args.reload_at, workers=args.workers, per_window=args.per_window,
                anchor=args.anchor,
            )))
    print("| run | workers | requests | failed | SIGHUP → applied (all workers) | "
          "SIGHUP → first request on e2 | to e0 after apply | "
          "in flight on e0 at the swap (gateway's log) | e0 ended 200 after SIGHUP (clients) | "
          "bad file refused | anchor | clients ran |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(results):
        print(f"| {i + 1} | {r.workers} | {r.requests} | {r.failed} | "
              f"{_ms(r.applied_s)} | {_ms(r.first_new_s)} | {r.removed_after_apply} | "
              f"{r.drained} | {r.drained_seen} | {_ms(r.bad_refused_s)} | {_anchor(r)} | "
              f"{r.duration_s:.1f} s |")
    for r in results:
        if r.errors:
            print("errors:", r.errors[:5])
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))


def _anchor(r: Result) -> str:
    if not r.anchor_tries:
        return "-"
    return f"{'ended 200 after the apply' if r.anchor_ok else 'NOT ok'} (try {r.anchor_tries})"


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.0f} ms"


if __name__ == "__main__":
    main()
