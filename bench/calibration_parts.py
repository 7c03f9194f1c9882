"""bench/calibration_parts.py: what the fidelity workload sees that the calibration probe does not,
on the real vLLM and on the emulator running the profile fitted to it, side by side.

    python bench/calibration_parts.py [--endpoint URL] [--rounds 2] [--repeats 3]
                                      [--out out/calibration-parts]

Without ``--endpoint`` it starts the fidelity tier's real vLLM (cores split as in
``bench/calibration.py``). ``inferplane calibrate``'s probe and fit (``--repeats`` rounds), then
``inferplane emulate`` on the fitted profile, then ``--rounds`` pairs of batteries alternating
the engines (real, emulator, emulator, real, …). One battery:

* **decode**: ``b`` streams (1, 2, 4) of fresh ``L``-token prompts (32, 384, 768) started
  together, 32 tokens each: the median of the streams' time per output token (first to last
  token) — the probe's decode points are ``L`` = 32 only;
* **arrival**: one stream (32-token prompt, 64 tokens out); after its 8th token one one-token
  request of ``L`` tokens (32, 384, 768) sent as text or as token ids: the stream's first-to-last
  span less the span of the same stream with no arrival (same battery), i.e. what one arrival
  costs a running stream, and the arrival's TTFT. Text against ids separates the API server's
  tokenising from the engine's prefill;
* **burst**: 2 or 4 requests (128-token prompts, 32 tokens out) sent together into an idle
  engine, against as many sent together the moment as many streams that ran together end (the
  closed-loop workload's levels 2 and 4 run in lockstep: every request of a level has the same
  output length, so its streams end in the same step and their successors arrive as a burst);
* **workload**: the fidelity workload (``physics.probe.run_workload``'s shape: concurrency 1, 2, 4,
  12 requests each, prompts cycling 768, 384, 128, 32, 32 tokens out) with every request
  tagged by its concurrency level and prompt length, and the engine's preemptions per level
  (``vllm:num_preemptions_total``).

Every figure is the median over the battery's repeats, then over rounds. Results in
``--out/results.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench.calibration import (  # noqa: E402
    PROFILE_NAME,
    SWEEP,
    emulator,
    start_real_engine,
    warm_up,
)
from inferplane.physics.probe import _nonce, calibrate_endpoint, prompt_of  # noqa: E402
from tests.fidelity import conftest as fid  # noqa: E402
from tests.fidelity.cores import descendants, split_cores  # noqa: E402

DECODE_BATCHES = (1, 2, 4)
LENGTHS = (32, 384, 768)
WORKLOAD_LENGTHS = (32, 128, 384, 768)


async def _stream(
    session: aiohttp.ClientSession,
    url: str,
    prompt: str | list[int],
    max_tokens: int,
    on_token: tuple[int, asyncio.Event] | None = None,
) -> tuple[float, list[float]]:
    """(send time, arrival time of every chunk that carries text)."""
    body: dict[str, Any] = {"model": fid.MODEL, "prompt": prompt, "max_tokens": max_tokens,
                            "temperature": 0.0, "stream": True}
    if max_tokens > 1:
        body["ignore_eos"] = True
        body["min_tokens"] = max_tokens
    sent = time.perf_counter()
    times: list[float] = []
    async with session.post(f"{url}/v1/completions", data=orjson.dumps(body),
                            headers={"Content-Type": "application/json"}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status} {(await resp.read())[:200]!r}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            now = time.perf_counter()
            choices = orjson.loads(line[5:]).get("choices") or []
            if choices and (choices[0].get("text") or choices[0].get("finish_reason")):
                times.append(now)
                if on_token is not None and len(times) == on_token[0]:
                    on_token[1].set()
    if not times:
        raise RuntimeError(f"{url}: a stream without tokens")
    return sent, times


def _tpot(times: list[float]) -> float:
    return (times[-1] - times[0]) / (len(times) - 1)


async def _preemptions(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("vllm:num_preemptions_total"))


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used, all its threads."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds of the real engine's API server and of its engine (every process below it)
    between :meth:`mark` calls: which side a piece of the workload costs (noise-immune, unlike
    the wall clock)."""

    def __init__(self, api_pid: int | None) -> None:
        self.api = api_pid
        self.engine = descendants(api_pid) if api_pid is not None else []
        self.last = self.read()

    def read(self) -> tuple[float, float]:
        if self.api is None:
            return 0.0, 0.0
        return cpu_s(self.api), sum(cpu_s(p) for p in self.engine)

    def mark(self) -> tuple[float, float]:
        now = self.read()
        d = (now[0] - self.last[0], now[1] - self.last[1])
        self.last = now
        return d


async def battery(url: str, repeats: int, api_pid: int | None = None) -> dict[str, Any]:
    """One battery (module docstring): raw per-repeat values, in ms. With ``api_pid`` (the
    real engine's API server, on this machine) also the API server's CPU time per arrival (by
    prompt length, text and ids) and per streamed token (``cpu``)."""
    out: dict[str, Any] = {"decode": {}, "arrival": {}, "workload": {}, "preemptions": {},
                           "cpu": {}}
    meter = CpuMeter(api_pid)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        for b in DECODE_BATCHES:
            for n in LENGTHS:
                runs = []
                meter.mark()
                for _ in range(repeats):
                    got = await asyncio.gather(*(_stream(s, url, prompt_of(n, _nonce()), 32)
                                                 for _ in range(b)))
                    runs.append(statistics.median(_tpot(t) for _, t in got) * 1e3)
                out["decode"][f"b{b} L{n}"] = runs
                api, eng = meter.mark()
                out["cpu"][f"decode b{b} L{n} per token"] = (api * 1e3 / (repeats * b * 32),
                                                             eng * 1e3 / (repeats * b * 32))
        cells = [(0, "none")] + [(n, kind) for n in LENGTHS for kind in ("text", "ids")]
        spans: dict[str, list[float]] = {}
        ttfts: dict[str, list[float]] = {}
        cpu: dict[str, list[tuple[float, float]]] = {}
        for _ in range(repeats):
            for n, kind in cells:
                meter.mark()
                ev = asyncio.Event()
                task = asyncio.ensure_future(
                    _stream(s, url, prompt_of(32, _nonce()), 64, on_token=(8, ev)))
                key = f"L{n} {kind}"
                if n:
                    await ev.wait()
                    prompt: str | list[int] = (prompt_of(n, _nonce()) if kind == "text"
                                               else [random.randint(4, 259) for _ in range(n)])
                    sent, t = await _stream(s, url, prompt, 1)
                    ttfts.setdefault(key, []).append((t[0] - sent) * 1e3)
                _, times = await task
                spans.setdefault(key, []).append((times[-1] - times[0]) * 1e3)
                cpu.setdefault(key, []).append(meter.mark())
        for key, v in cpu.items():  # ms per cell (the stream's 64 tokens and the arrival); a
            # mean: /proc counts CPU time in ticks of 10 ms
            out["cpu"][f"arrival {key}"] = (statistics.fmean(x[0] for x in v) * 1e3,
                                            statistics.fmean(x[1] for x in v) * 1e3)
        base = statistics.median(spans["L0 none"])
        out["arrival"] = {k: {"span_ms": v, "extra_ms": [x - base for x in v],
                              "ttft_ms": ttfts.get(k, [])} for k, v in spans.items()}
        # b requests sent together into an idle engine, against b sent together the moment b
        # streams that ran together end (how the closed-loop workload's levels 2 and 4 send)
        for b in (2, 4):
            idle, after = [], []
            for _ in range(repeats):
                got = await asyncio.gather(*(_stream(s, url, prompt_of(128, _nonce()), 32)
                                             for _ in range(b)))
                idle.append(statistics.median((t[0] - sent) * 1e3 for sent, t in got))

                async def chained() -> float:
                    await _stream(s, url, prompt_of(128, _nonce()), 32)
                    sent, t = await _stream(s, url, prompt_of(128, _nonce()), 32)
                    return (t[0] - sent) * 1e3

                after.append(statistics.median(await asyncio.gather(
                    *(chained() for _ in range(b)))))
            out["burst"] = {**out.get("burst", {}), f"{b} idle": idle,
                            f"{b} after {b} streams end": after}
        p0 = await _preemptions(s, url)
        for c in (1, 2, 4):
            todo = [WORKLOAD_LENGTHS[i % len(WORKLOAD_LENGTHS)] for i in range(12)]

            async def worker(todo: list[int] = todo, c: int = c) -> None:
                while todo:
                    n = todo.pop()
                    sent, t = await _stream(s, url, prompt_of(n, _nonce()), 32)
                    out["workload"].setdefault(f"c{c} L{n}", []).append(
                        ((t[0] - sent) * 1e3, _tpot(t) * 1e3))

            await asyncio.gather(*(worker() for _ in range(c)))
            p1 = await _preemptions(s, url)
            out["preemptions"][f"c{c}"] = p1 - p0
            p0 = p1
    return out


def summarise(batteries: list[dict[str, Any]]) -> dict[str, float]:
    """Median over each battery's repeats, then over batteries: one number per figure."""
    rows: dict[str, list[float]] = {}
    for bat in batteries:
        for k, v in bat["decode"].items():
            rows.setdefault(f"decode {k} TPOT", []).append(statistics.median(v))
        for k, v in bat["arrival"].items():
            rows.setdefault(f"arrival {k} stream span", []).append(
                statistics.median(v["span_ms"]))
            if k != "L0 none":
                rows.setdefault(f"arrival {k} extra", []).append(statistics.median(v["extra_ms"]))
                rows.setdefault(f"arrival {k} TTFT", []).append(statistics.median(v["ttft_ms"]))
        for k, v in sorted(bat["workload"].items()):
            rows.setdefault(f"workload {k} TTFT", []).append(statistics.median(x[0] for x in v))
            rows.setdefault(f"workload {k} TPOT", []).append(statistics.median(x[1] for x in v))
        for k, v in bat.get("burst", {}).items():
            rows.setdefault(f"burst of {k}: TTFT (median rank)", []).append(statistics.median(v))
        for k, v in bat["preemptions"].items():
            rows.setdefault(f"preemptions {k}", []).append(v)
        for k, (api, eng) in bat["cpu"].items():
            rows.setdefault(f"cpu ms {k}: API server", []).append(api)
            rows.setdefault(f"cpu ms {k}: engine", []).append(eng)
    return {k: round(statistics.median(v), 3) for k, v in rows.items()}


def run(
    url: str, work: Path, rounds: int, repeats: int, probe_repeats: int, api_pid: int | None
) -> dict[str, Any]:
    asyncio.run(warm_up(url))
    text, summary = asyncio.run(calibrate_endpoint(
        url, fid.MODEL, model_profile=fid.MODEL, base="cpu", name=PROFILE_NAME,
        precision="fp32", prompt_tokens=SWEEP, batches=(1, 2, 4), repeats=probe_repeats,
    ))
    profile = work / "profile.yaml"
    profile.write_text(text)
    res: dict[str, Any] = {"fit": summary, "profile": text, "real": [], "emulator": [],
                           "load_per_battery": []}
    with emulator(PROFILE_NAME, profile, work) as emu_url:
        asyncio.run(warm_up(emu_url))
        for r in range(rounds):
            pair = [("real", url), ("emulator", emu_url)]
            for name, u in (pair if r % 2 == 0 else pair[::-1]):
                res[name].append(asyncio.run(
                    battery(u, repeats, api_pid if name == "real" else None)))
                res["load_per_battery"].append(round(os.getloadavg()[0], 2))
    res["summary"] = {name: summarise(res[name]) for name in ("real", "emulator")}
    return res


def table(res: dict[str, Any]) -> str:
    real, emu = res["summary"]["real"], res["summary"]["emulator"]
    lines = ["| figure | real | emulator | gap |", "|---|---|---|---|"]
    for k, v in real.items():
        e = emu.get(k)
        gap = f"{(e - v) / v:+.0%}" if e is not None and v and not k.startswith("preempt") else ""
        lines.append(f"| {k} | {v} | {e} | {gap} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", help="a running real engine (default: start the fidelity one)")
    ap.add_argument("--rounds", type=int, default=2, help="pairs of batteries (real, emulator)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each point per battery")
    ap.add_argument("--probe-repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "calibration-parts")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    proc: subprocess.Popen[bytes] | None = None
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        try:
            if a.endpoint is None:
                proc, url = start_real_engine(work)
                res_cores = stack.enter_context(split_cores(proc.pid))
            else:
                url, res_cores = a.endpoint, {}
            res = run(url, work, a.rounds, a.repeats, a.probe_repeats,
                      proc.pid if proc is not None else None)
        finally:
            stack.close()
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, 15)
                proc.wait(30)
    res["cores"] = res_cores
    res["machine"] = {"cpus": os.cpu_count(), "load_1m_before": round(load_before, 2),
                      "load_1m_after": round(os.getloadavg()[0], 2)}
    res["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    (a.out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(res["fit"])
    print(table(res))
    print(f"cores: {res_cores or 'shared (not pinned)'}; machine: {res['machine']}; {res['date']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
