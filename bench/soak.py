"""bench/soak.py: the gateway under steady load for a long time (issue 12's soak target: 30 min
at 20 req/s, RSS growth < 10 %, 0 errors).

    python bench/soak.py [--seconds 1800] [--rate 20] [--warmup 60] [--out out/soak.json]

Starts a fast fake upstream (two endpoints) and a gateway process with a file ledger (so the
durable ledger, the local admission store and the batch store are all in play), then sends
``--rate`` requests a second, open loop, for ``--seconds``: half streamed, half not, each with a
fresh prompt and a session id from a small pool. Every 10 s it samples the gateway's VmRSS from
/proc. RSS growth is measured from the end of ``--warmup`` (allocators and caches fill first) to
the end; every answer that is not a 200 counts as an error. Bounded: loopback only, at most
``seconds × rate`` requests, every process stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from inferplane.core.plane import hash_key  # noqa: E402
from tests.support.procs import free_port  # noqa: E402

KEY = "sk-bench-soak"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{what} not ready at {url}")


async def drive(base: str, seconds: float, rate: float, pid: int, warmup: float
                ) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    samples: list[tuple[float, float]] = []
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    pending: set[asyncio.Task[None]] = set()
    t0 = time.monotonic()

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        stream = i % 2 == 0
        body = {"model": "m", "max_tokens": 16, "stream": stream,
                "messages": [{"role": "user", "content": f"request {i}: tell me about soak"}]}
        try:
            async with session.post(f"{base}/v1/chat/completions", json=body,
                                    headers={**headers, "x-session-id": f"s{i % 50}"}) as r:
                await r.read()
                key = str(r.status)
        except (TimeoutError, aiohttp.ClientError) as exc:
            key = type(exc).__name__
        statuses[key] = statuses.get(key, 0) + 1

    async def sampler() -> None:
        while True:
            samples.append((time.monotonic() - t0, rss_mb(pid)))
            await asyncio.sleep(10)

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        sample_task = asyncio.create_task(sampler())
        i = 0
        while (elapsed := time.monotonic() - t0) < seconds:
            due = int(elapsed * rate)
            while i < due:
                task = asyncio.create_task(one(session, i))
                pending.add(task)
                task.add_done_callback(pending.discard)
                i += 1
            await asyncio.sleep(0.01)
        await asyncio.gather(*pending)
        sample_task.cancel()
        samples.append((time.monotonic() - t0, rss_mb(pid)))
    after_warmup = next((mb for t, mb in samples if t >= warmup), samples[0][1])
    end = samples[-1][1]
    errors = sum(n for k, n in statuses.items() if k != "200")
    return {"requests": i, "statuses": statuses, "errors": errors,
            "rss_mb_after_warmup": after_warmup, "rss_mb_end": end,
            "rss_growth": (end - after_warmup) / after_warmup,
            "rss_mb_max": max(mb for _, mb in samples), "samples": samples}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1800.0)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "soak.json")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    ups = [free_port(), free_port()]
    port = free_port()
    endpoints = "".join(
        f"""
      - {{name: up{i}, url: "http://127.0.0.1:{p}",
         models: [{{name: m, profile: llama-3.1-8b, max_context: 4096}}]}}"""
        for i, p in enumerate(ups))
    (tmp / "fleet.yaml").write_text(f"""
gateway: {{port: {port}, ledger_path: {tmp / 'ledger.sqlite'}, scrape_interval_s: 0.5}}
substrates:
  - name: pool
    kind: gpu
    hardware: h100
    region: r1
    jurisdiction: eu
    cost: {{hourly_usd: 1.0}}
    endpoints:{endpoints}
tenants:
  - {{name: a, api_keys: ["{hash_key(KEY)}"]}}
""")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    up = subprocess.Popen([sys.executable, "-m", "tests.support.fake_upstream",
                           *[x for p in ups for x in ("--port", str(p))], "--mode", "ok"],
                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gw = None
    try:
        wait_http(f"http://127.0.0.1:{ups[0]}/health", up, "fake upstream")
        gw = subprocess.Popen([sys.executable, "-m", "inferplane.cli", "serve", "--config",
                               str(tmp / "fleet.yaml"), "--log-level", "warning"], env=env,
                              stdout=subprocess.DEVNULL, stderr=(tmp / "gw.log").open("wb"))
        wait_http(f"http://127.0.0.1:{port}/ready", gw, "gateway")
        res = asyncio.run(drive(f"http://127.0.0.1:{port}", a.seconds, a.rate, gw.pid, a.warmup))
    finally:
        for p in (gw, up):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(15)
    res.update(seconds=a.seconds, rate=a.rate, warmup_s=a.warmup,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               load_1m_end=os.getloadavg()[0])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"{res['requests']} requests in {a.seconds:.0f} s at {a.rate}/s: "
          f"statuses {res['statuses']}, errors {res['errors']}")
    print(f"gateway RSS: {res['rss_mb_after_warmup']:.1f} MB after {a.warmup:.0f} s warm-up, "
          f"{res['rss_mb_end']:.1f} MB at the end ({res['rss_growth']:+.1%}), "
          f"max {res['rss_mb_max']:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
