"""bench/stream_relay: what relaying costs the gateway, several source trees side by side in one
run (harden27): the CPU time per relayed stream event (each OpenAI-dialect event is parsed as
JSON to check it since d93d4c0: `dispatch.upstream._OpenAIEvents`, `dispatch.answer.OpenAIEvents`
since edge28), and the gateway's memory
while relaying a 200 MB non-streamed answer (``gateway.max_upstream_body_bytes``, 64 MiB by
default since d93d4c0: a 502 instead).

One fake upstream process (this file with ``--upstream PORT``) streams ``--events`` chunks of
vLLM's shape per request, each in its own write as an engine sends them, then its usage chunk
and ``[DONE]``; asked for the model ``huge`` without streaming it answers a ``--huge-mb`` MB
chat completion in 1 MB writes. For each tree a gateway process runs (round-robin, one endpoint,
``INFERPLANE_PURE=1`` in every tree so that only the relay differs); the rounds alternate the
trees (A B C, B C A, ...), and each round sends ``--requests`` streams to one gateway,
``--concurrency`` at a time, reading the gateway's CPU time (utime + stime of /proc/PID/stat)
before and after. Then each gateway is asked for the huge answer once: its status, VmRSS
before, VmHWM (the peak) after, VmRSS after.

    python bench/stream_relay.py --tree before=/tmp/a/src --tree main=/tmp/b/src \\
        --tree branch=src [--rounds 6] [--requests 1000] [--events 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEY = "sk-bench-relay"
TICK = os.sysconf("SC_CLK_TCK")


# -- the upstream --------------------------------------------------------------------------

def _chunk(i: int, finish: str | None = None) -> bytes:
    return b"data: " + json.dumps({
        "id": "chatcmpl-b", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {} if finish else {"content": f" w{i}"},
                     "logprobs": None, "finish_reason": finish}],
    }, separators=(",", ":")).encode() + b"\n\n"


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    events: int = request.app["events"]
    if not body.get("stream"):
        if body["model"] == "huge":
            return await _huge(request)
        return web.json_response({"id": "x", "object": "chat.completion", "model": "m",
                                  "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                      "role": "assistant", "content": "hi"}}]})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(events):
        await resp.write(_chunk(i))
    await resp.write(_chunk(events, "stop"))
    await resp.write(b"data: " + json.dumps({
        "id": "chatcmpl-b", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": events,
                                 "total_tokens": 7 + events}}).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _huge(request: web.Request) -> web.StreamResponse:
    mb: int = request.app["huge_mb"]
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    await resp.write(b'{"id":"x","object":"chat.completion","model":"huge","choices":[{"index":0,'
                     b'"finish_reason":"stop","message":{"role":"assistant","content":"')
    block = b"x" * (1 << 20)
    for _ in range(mb):
        await resp.write(block)
    await resp.write(b'"}}],"usage":{"prompt_tokens":7,"completion_tokens":1,"total_tokens":8}}')
    await resp.write_eof()
    return resp


async def _empty(request: web.Request) -> web.Response:
    return web.Response(text="")


def serve_upstream(port: int, events: int, huge_mb: int) -> None:
    app = web.Application()
    app["events"], app["huge_mb"] = events, huge_mb
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/health", _empty)
    app.router.add_get("/metrics", _empty)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# -- the stream check alone -------------------------------------------------------------------

MICRO = """
import sys, time
from inferplane.dispatch import upstream
events, n = int(sys.argv[1]), int(sys.argv[2])
sys.path.insert(0, sys.argv[3])
from stream_relay import _chunk
chunks = [_chunk(i) for i in range(events)] + [_chunk(events, "stop"), b"data: [DONE]\\n\\n"]
check = getattr(upstream, "_OpenAIEvents", None)  # before edge28: in dispatch.upstream
if check is None:
    try:
        from inferplane.dispatch.answer import OpenAIEvents as check
    except ImportError:
        check = None
if check is None:
    print(0.0)
    raise SystemExit
best = None
for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(n):
        c = check()
        for chunk in chunks:
            c.feed(chunk)
        assert c.close() is None and c.done
    t = (time.perf_counter() - t0) / (n * len(chunks))
    best = t if best is None else min(best, t)
print(best * 1e9)
"""


def micro(trees: list[tuple[str, Path]], events: int, rounds: int) -> dict[str, list[float]]:
    """ns per event of each tree's `OpenAIEvents.feed` alone, one engine event a chunk (the
    best of 5 passes per round, rounds alternating the trees; 0 where the tree has none)."""
    out: dict[str, list[float]] = {name: [] for name, _ in trees}
    for r in range(rounds):
        for name, src in trees[r % len(trees):] + trees[:r % len(trees)]:
            env = {**os.environ, "PYTHONPATH": str(src), "INFERPLANE_PURE": "1"}
            res = subprocess.run([sys.executable, "-c", MICRO, str(events), "200",
                                  str(Path(__file__).parent)], env=env, capture_output=True,
                                 text=True, check=True)
            out[name].append(float(res.stdout.strip()))
    return out


# -- the gateways ----------------------------------------------------------------------------

def _status(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


class Gw:
    def __init__(self, name: str, src: Path, up_port: int, tmp: Path) -> None:
        from tests.builders import model, pool_fleet, tenant, to_yaml
        from tests.support.procs import free_port

        self.name, self.port = name, free_port()
        fleet = tmp / f"{name}.yaml"
        fleet.write_text(to_yaml(pool_fleet(
            up_port, substrate={"cost": {"hourly_usd": 1.0}},
            models=[model(max_context=4096), model(name="huge", max_context=4096)],
            endpoint_fields={"name": "up"},
            gateway={"port": self.port, "default_profile": "round-robin"},
            tenants=[tenant("a", KEY)])))
        env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{ROOT}", "INFERPLANE_PURE": "1"}
        self.p = subprocess.Popen(
            [sys.executable, "-m", "inferplane.cli", "serve", "--config", str(fleet),
             "--log-level", "error"], env=env, stdout=subprocess.DEVNULL,
            stderr=open(tmp / f"{name}.log", "wb"))  # noqa: SIM115
        self.base = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.p.terminate()
        self.p.wait(20)


async def _ready(s: aiohttp.ClientSession, base: str) -> None:
    for _ in range(300):
        try:
            async with s.get(f"{base}/ready") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{base} never ready")


async def _stream(s: aiohttp.ClientSession, base: str) -> int:
    async with s.post(f"{base}/v1/chat/completions", json={
        "model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {KEY}"}) as r:
        body = await r.read()
        if r.status != 200 or not body.endswith(b"data: [DONE]\n\n") or b'"error"' in body:
            raise RuntimeError(f"{base}: HTTP {r.status}: {body[-300:]!r}")
        return body.count(b"data: ")


async def _round(s: aiohttp.ClientSession, gw: Gw, n: int, conc: int) -> dict[str, float]:
    sem = asyncio.Semaphore(conc)
    counted = [0]

    async def one() -> None:
        async with sem:
            n = await _stream(s, gw.base)  # (not `+= await`: that reads the total first)
            counted[0] += n

    cpu0, t0 = _cpu_s(gw.p.pid), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    wall, cpu = time.perf_counter() - t0, _cpu_s(gw.p.pid) - cpu0
    return {"cpu_s": cpu, "wall_s": wall, "events": counted[0],
            "cpu_us_per_event": cpu / counted[0] * 1e6, "cpu_ms_per_stream": cpu / n * 1e3}


async def _huge_answer(s: aiohttp.ClientSession, gw: Gw) -> dict[str, Any]:
    await asyncio.sleep(1.0)
    before = _status(gw.p.pid)
    t0 = time.perf_counter()
    async with s.post(f"{gw.base}/v1/chat/completions", json={
        "model": "huge", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=aiohttp.ClientTimeout(total=600)) as r:
        size = 0
        async for block in r.content.iter_chunked(1 << 20):
            size += len(block)
        status = r.status
    wall = time.perf_counter() - t0
    peak = _status(gw.p.pid)
    await asyncio.sleep(3.0)
    after = _status(gw.p.pid)
    return {"status": status, "bytes": size, "wall_s": wall, "rss_before_mb": before["VmRSS"],
            "hwm_before_mb": before["VmHWM"], "hwm_after_mb": peak["VmHWM"],
            "rss_settled_mb": after["VmRSS"]}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from tests.support.procs import free_port

    tmp = Path(tempfile.mkdtemp(prefix="stream-relay-"))
    up_port = free_port()
    up = subprocess.Popen([sys.executable, __file__, "--upstream", str(up_port), "--events",
                           str(args.events), "--huge-mb", str(args.huge_mb)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trees = [(t.split("=", 1)[0], Path(t.split("=", 1)[1]).resolve()) for t in args.tree]
    gws = [Gw(name, src, up_port, tmp) for name, src in trees]
    out: dict[str, Any] = {"rounds": [], "huge": {}}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            for gw in gws:
                await _ready(s, gw.base)
                for _ in range(20):  # warm up (imports, first connections)
                    await _stream(s, gw.base)
            for r in range(args.rounds):
                order = gws[r % len(gws):] + gws[:r % len(gws)]
                for gw in order:
                    res = await _round(s, gw, args.requests, args.concurrency)
                    out["rounds"].append({"round": r, "tree": gw.name, **res})
                    print(f"round {r} {gw.name:<8} {res['cpu_us_per_event']:7.2f} µs CPU/event "
                          f"{res['cpu_ms_per_stream']:7.3f} ms CPU/stream "
                          f"{res['wall_s']:6.2f} s wall", flush=True)
            if args.huge_mb:
                for gw in gws:
                    out["huge"][gw.name] = h = await _huge_answer(s, gw)
                    print(f"huge {gw.name:<8} {h}", flush=True)
    finally:
        for gw in gws:
            gw.stop()
        up.terminate()
        up.wait(10)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tree", action="append", default=[],
                    help="NAME=SRC: a tree's src/ directory (repeat)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--events", type=int, default=256)
    ap.add_argument("--huge-mb", type=int, default=200)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--micro", type=int, default=0, metavar="ROUNDS",
                    help="time each tree's stream check alone instead, in this many rounds")
    args = ap.parse_args()
    if args.upstream:
        serve_upstream(args.upstream, args.events, args.huge_mb)
        return
    if args.micro:
        trees = [(t.split("=", 1)[0], Path(t.split("=", 1)[1]).resolve()) for t in args.tree]
        res = micro(trees, args.events, args.micro)
        print("| tree | `_OpenAIEvents.feed` ns per event, median (min-max) of rounds |")
        print("|---|---|")
        for name, xs in res.items():
            print(f"| {name} | {statistics.median(xs):.0f} ({min(xs):.0f}-{max(xs):.0f}) |")
        if args.json:
            args.json.with_suffix(".micro.json").write_text(json.dumps(res, indent=1))
        return
    out = asyncio.run(main_async(args))
    print(f"\n{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print("| tree | rounds | CPU µs/event median (min-max) | CPU ms/stream median |")
    print("|---|---|---|---|")
    for name in dict.fromkeys(r["tree"] for r in out["rounds"]):
        rs = [r for r in out["rounds"] if r["tree"] == name]
        ev = [r["cpu_us_per_event"] for r in rs]
        st = [r["cpu_ms_per_stream"] for r in rs]
        print(f"| {name} | {len(rs)} | {statistics.median(ev):.2f} ({min(ev):.2f}-{max(ev):.2f}) "
              f"| {statistics.median(st):.3f} |")
    if out["huge"]:
        print("\n| tree | status | bytes to client | RSS before MB | peak RSS (VmHWM) MB | "
              "RSS 3 s after MB |")
        print("|---|---|---|---|---|---|")
        for name, h in out["huge"].items():
            print(f"| {name} | {h['status']} | {h['bytes']} | {h['rss_before_mb']:.0f} | "
                  f"{h['hwm_after_mb']:.0f} | {h['rss_settled_mb']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
