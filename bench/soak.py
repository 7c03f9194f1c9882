"""bench/soak.py: the gateway under steady load for a long time (issue 12's soak target: 30 min
at 20 req/s, RSS growth < 10 %, 0 errors).

    [nice -n -5] python bench/soak.py [--seconds 1800] [--rate 20] [--warmup 60]
                                      [--out out/soak.json]

Starts a fast fake upstream (two endpoints) and a gateway process with a file ledger (so the
durable ledger, the local admission store and the batch store are all in play), then sends
``--rate`` requests a second, open loop, for ``--seconds``: half streamed, half not, each with a
fresh prompt and a session id from a small pool. Every 10 s it samples the gateway's VmRSS from
/proc, the host's 1-minute load average and the gateway's event-loop lag (from its /metrics).
RSS growth is measured from the end of ``--warmup`` (allocators and caches fill first) to
the end; every answer that is not a 200 counts as an error, tallied by status and OpenAI error
code. At the end it reads the gateway's ejection and upstream-failure counters and keeps its log
(``<out>.gw.log``). Run under ``nice -n -5`` (root) the upstream and the gateway inherit the
priority: a dedicated gateway host on a machine other jobs load. Bounded: loopback only, at
most ``seconds × rate`` requests, every process stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
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

from tests.builders import endpoint, model, pool_fleet, tenant, to_yaml  # noqa: E402
from tests.support.procs import free_port  # noqa: E402

KEY = "sk-bench-soak"


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """VmRSS (all resident pages), or RssAnon (the heap and other anonymous memory: what a
    leak grows; file-backed pages come and go with the host's page cache)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


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


LAG = re.compile(r"^inferplane_event_loop_lag_(seconds_total|max_seconds) (\S+)$", re.M)
COUNTERS = re.compile(
    r"^(inferplane_endpoint_ejections_total|inferplane_upstream_failures_total)\{(.*)\} (\S+)$",
    re.M,
)


async def read_metrics(session: aiohttp.ClientSession, base: str) -> str:
    try:
        async with session.get(f"{base}/metrics") as r:
            return await r.text()
    except (TimeoutError, aiohttp.ClientError):
        return ""


async def drive(base: str, seconds: float, rate: float, pid: int, warmup: float
                ) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    codes: dict[str, int] = {}
    samples: list[tuple[float, float]] = []
    anon: list[tuple[float, float]] = []
    loads: list[tuple[float, float]] = []
    lags: list[tuple[float, float, float]] = []  # (t, lost total, worst in the last 60 s)
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
                data = await r.read()
                key = str(r.status)
                if r.status != 200:
                    try:
                        err = json.loads(data)["error"]
                        code = f"{r.status} {err.get('code') or err.get('type')}"
                    except (ValueError, KeyError, TypeError):
                        code = f"{r.status} (not JSON)"
                    codes[code] = codes.get(code, 0) + 1
                    print(f"[{time.monotonic() - t0:7.1f} s] {code}: {data[:300]!r}",
                          file=sys.stderr)
        except (TimeoutError, aiohttp.ClientError) as exc:
            key = type(exc).__name__
        statuses[key] = statuses.get(key, 0) + 1

    async def sample(session: aiohttp.ClientSession) -> None:
        t = time.monotonic() - t0
        samples.append((t, rss_mb(pid)))
        anon.append((t, rss_mb(pid, "RssAnon")))
        loads.append((t, os.getloadavg()[0]))
        found = dict(LAG.findall(await read_metrics(session, base)))
        if found:
            lags.append((t, float(found["seconds_total"]), float(found["max_seconds"])))

    async def sampler(session: aiohttp.ClientSession) -> None:
        while True:
            await sample(session)
            await asyncio.sleep(10)

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        sample_task = asyncio.create_task(sampler(session))
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
        await sample(session)
        text = await read_metrics(session, base)
    after_warmup = next((mb for t, mb in samples if t >= warmup), samples[0][1])
    end = samples[-1][1]
    anon_warm = next((mb for t, mb in anon if t >= warmup), anon[0][1])
    errors = sum(n for k, n in statuses.items() if k != "200")
    counters = {f"{name}{{{labels}}}": float(v) for name, labels, v in COUNTERS.findall(text)}
    la = [x for _, x in loads]
    return {"requests": i, "statuses": statuses, "error_codes": codes, "errors": errors,
            "rss_mb_after_warmup": after_warmup, "rss_mb_end": end,
            "rss_growth": (end - after_warmup) / after_warmup,
            "rss_mb_max": max(mb for _, mb in samples), "samples": samples,
            "anon_mb_after_warmup": anon_warm, "anon_mb_end": anon[-1][1],
            "anon_growth": (anon[-1][1] - anon_warm) / anon_warm,
            "anon_mb_max": max(mb for _, mb in anon), "anon_samples": anon,
            "load_1m_during": {"min": min(la), "median": statistics.median(la), "max": max(la)},
            "load_samples": loads,
            "loop_lag_lost_s": lags[-1][1] if lags else None,
            "loop_lag_worst_s": max((x for _, _, x in lags), default=None),
            "lag_samples": lags, "counters": counters}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1800.0)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "soak.json")
    a = ap.parse_args()
    load_before = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    ups = [free_port(), free_port()]
    port = free_port()
    (tmp / "fleet.yaml").write_text(to_yaml(pool_fleet(
        endpoints=[endpoint(f"up{i}", p, models=[model(max_context=4096)])
                   for i, p in enumerate(ups)],
        substrate={"cost": {"hourly_usd": 1.0}},
        gateway={"port": port, "ledger_path": str(tmp / "ledger.sqlite"),
                 "scrape_interval_s": 0.5, "metrics": {"public": True}},
        tenants=[tenant("a", KEY)])))
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
    res.update(seconds=a.seconds, rate=a.rate, warmup_s=a.warmup, commit=commit,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               niceness=os.nice(0), load_before=load_before, load_after=os.getloadavg())
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    shutil.copy(tmp / "gw.log", a.out.with_suffix(".gw.log"))
    print(f"{res['requests']} requests in {a.seconds:.0f} s at {a.rate}/s (git {commit}, "
          f"nice {res['niceness']}): statuses {res['statuses']}, errors {res['errors']} "
          f"{res['error_codes']}")
    ld = res["load_1m_during"]
    print(f"load average: before {load_before[0]:.2f}, during {ld['min']:.2f}-{ld['max']:.2f} "
          f"(median {ld['median']:.2f}), after {res['load_after'][0]:.2f}")
    print(f"gateway event-loop lag: {res['loop_lag_lost_s']} s lost in all, worst tick "
          f"{res['loop_lag_worst_s']} s; counters {res['counters']}")
    print(f"gateway RSS: {res['rss_mb_after_warmup']:.1f} MB after {a.warmup:.0f} s warm-up, "
          f"{res['rss_mb_end']:.1f} MB at the end ({res['rss_growth']:+.1%}), "
          f"max {res['rss_mb_max']:.1f} MB; anonymous (RssAnon) {res['anon_mb_after_warmup']:.1f}"
          f" → {res['anon_mb_end']:.1f} MB ({res['anon_growth']:+.1%}), "
          f"max {res['anon_mb_max']:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
