"""bench/calibration.py: calibrate against a real vLLM, then check the profile's predictions and
the emulator running it against the same engine — beside the table's ``cpu`` profile.

    python bench/calibration.py [--endpoint URL | --truth PROFILE.yaml] [--rounds 3]
                                [--real-rounds N] [--requests 12] [--repeats 5] [--ab]
                                [--out out/calibration]

Without ``--endpoint`` it starts the fidelity tier's real vLLM (``.fidelity-venv``, the tiny
Llama, the engine settings of ``tests/fidelity/conftest.py``) and stops it at the end. With
``--truth PROFILE.yaml`` the "real" engine is ``inferplane emulate`` running that profile (in slow
motion, ``--truth-time-scale``): a self-check of the probe and the fit against an engine whose
factors are known (``bench/calibration_truth.yaml``). ``--ab`` runs, instead of the table's
profile, the same probe fitted with attention priced with the matmuls (the fit before session
11, :func:`refit_one_price`), both emulators in alternate rounds: a side-by-side on one probe.

1. ``inferplane calibrate``'s probe and fit (``physics.probe.calibrate_endpoint``), base ``cpu``;
2. TTFT on prompt lengths the probe never sent (:data:`HELD_OUT`, the median over all the cold
   requests, :data:`HELD_OUT_PER_ROUND` after each probe round) and every rank of a burst of a
   size it never sent (:data:`HELD_OUT_BURST`, median over as many), against each profile's
   prediction (the placement predictor's, which sees only the requests sent before each one;
   beside it the burst as the physics model predicts it told the whole burst,
   :func:`held_out_errors`);
3. the fidelity workload (``physics.probe.run_workload``: concurrency 1, 2 and 4, fresh prompts of
   32-768 tokens, 32 output tokens) on the real engine (``--real-rounds``, default
   ``--rounds``) and on ``inferplane emulate`` running each profile in its own process
   (``--rounds``); per round P50/P90 of TTFT and time per output token, then the median over
   rounds (beside it, the percentiles pooled over every request of every round);
4. the control: the real engine's odd rounds against its even rounds on the same four figures
   (:func:`real_vs_real`; a glimpse of the statistic's noise, not its size: see there, and
   ``bench/calibration_control.py`` for how often an emulator with no error would pass);
5. a table, and ``results.json`` in ``--out`` (with every round's raw samples).

The held-out requests and the real engine's workload rounds run between the probe's rounds
(``calibrate_endpoint``'s ``between_rounds``), so that the fit, the held-out points and the
workload all spread over the same minutes: on a shared host the engine runs faster or slower
for a minute at a time (session 9 measured the workload ±40 % off the probe two minutes
earlier), which moved one against the others when they came one after the other. The
emulators' rounds follow the fit (their timing is the model's: rounds agree within a few %).

Targets (issue 13): calibrated TTFT prediction median absolute error ≤ 20 %; emulator P50/P90
within 15 % of the real engine. A real engine whose HTTP front end sends >10 % of its streams in
one burst (starved of CPU) is reported as such: its latencies then measure the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench.calibration_control import positive_int  # noqa: E402
from inferplane.config.loader import parse_config  # noqa: E402
from inferplane.fleet.model import Fleet  # noqa: E402
from inferplane.physics import get_hardware  # noqa: E402
from inferplane.physics.calibration import (  # noqa: E402
    BurstPoint,
    DecodePoint,
    LoadedPoint,
    PrefillPoint,
    dump_profile,
    fit,
    fit_frontend,
    load_hardware_profile,
    predict_burst_s,
)
from inferplane.physics.hardware import HardwareProfile  # noqa: E402
from inferplane.physics.models import get_model  # noqa: E402
from inferplane.physics.probe import (  # noqa: E402
    Prober,
    WorkloadResult,
    calibrate_endpoint,
    run_workload,
)
from inferplane.physics.roofline import Roofline  # noqa: E402
from tests.builders import model, pool_fleet, to_yaml  # noqa: E402
from tests.fidelity import conftest as fid  # noqa: E402
from tests.fidelity.cores import split_cores  # noqa: E402
from tests.placement_helpers import cycle, plugin, profile, snapshot, state  # noqa: E402
from tests.support.procs import Proc, free_port  # noqa: E402

SWEEP = (16, 64, 128, 256, 512, 768)
HELD_OUT = (96, 320, 640)
HELD_OUT_BURST = (3, 320)  # a burst size and prompt length the probe never sent
PROFILE_NAME = "cpu-fidelity"


def _pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


async def warm_up(url: str) -> bool:
    async with aiohttp.ClientSession() as session:
        return await Prober(url, fid.MODEL).warm_up(session)


#: Held-out repeats after each of the probe's rounds: the same number after every round, so that
#: the held-out medians weight the rounds as the probe's own points do (each round the same
#: number of tries: one a round for the decode points, ``PREFILL_VISITS`` spread through it for
#: the prefill points since session 23).
#: Until session 22, 7 repeats spread 2, 2, 1, 1, 1 over the 5 rounds: the first two rounds,
#: in several runs the slowest minutes of the engine (session 21's new2: the lone 96-token
#: request 6.8 and 7.7 ms after round 0, 4.2-4.8 ms after rounds 1-4), held 4 of the 7 samples
#: and moved the held-out medians against the probe's points (docs/benchmarks.md, session 22).
#: With fewer probe rounds (``--repeats`` 1-3) :func:`held_out_per_round` raises it, still the
#: same after every round, so that the held-out set is never smaller than the 7 of before.
HELD_OUT_PER_ROUND = 2
#: The fewest held-out repeats in all (the number before session 22).
HELD_OUT_MIN = 7


def held_out_per_round(repeats: int) -> int:
    """Held-out repeats after each of ``repeats`` probe rounds: :data:`HELD_OUT_PER_ROUND`, or
    more where that would make fewer than :data:`HELD_OUT_MIN` in all (1 round: 7; 2: 4;
    3: 3)."""
    return max(HELD_OUT_PER_ROUND, math.ceil(HELD_OUT_MIN / repeats))


class HeldOut:
    """TTFT of a lone fresh prompt of each of ``lengths`` tokens (its engine-counted tokens and
    the median over the cold requests), and of each rank of a burst of ``burst = (size,
    tokens)`` fresh one-token requests (median over the bursts), measured a few repeats at a
    time (:meth:`measure`) between the probe's rounds, as the probe's own sweeps are
    interleaved (every repeat visits every point once), so that a stretch of load on the
    machine spreads over the points and over the probe alike instead of bending one of them."""

    def __init__(self, lengths: tuple[int, ...], burst: tuple[int, int]) -> None:
        self.lengths, self.burst = lengths, burst
        self.cold: dict[int, list[Any]] = {n: [] for n in lengths}
        self.runs: list[list[float]] = []
        self._probers: dict[str, Prober] = {}  # per engine URL, its words per token learned

    async def measure(self, url: str, repeats: int) -> None:
        size, burst_tokens = self.burst
        async with aiohttp.ClientSession() as session:
            prober = self._probers.get(url)
            if prober is None:  # once: every later round asks the same engine's tokeniser
                prober = self._probers[url] = Prober(url, fid.MODEL)
                await prober.learn_words_per_token(session)
            # a fresh session has no connection: without this the first lone request of every
            # call (the 96-token one) paid for opening it, and the first burst for two more
            # (session 21: +0.7 ms, 16 % of a 96-token TTFT on the fidelity vLLM)
            await prober.open_connections(session, size)
            for _ in range(repeats):
                for n in self.lengths:
                    self.cold[n].append((await prober.prefill_once(session, n))[0])
                self.runs.append(await prober.burst_once(session, size, burst_tokens))

    def result(self) -> tuple[list[tuple[int, float]], list[float]]:
        alone = [(int(statistics.median(s.prompt_tokens for s in self.cold[n])),
                  statistics.median(s.ttft_s for s in self.cold[n])) for n in self.lengths]
        return alone, [statistics.median(r[i] for r in self.runs) for i in range(self.burst[0])]


def predicted_ttft_s(fleet_text: str, tokens: int, ahead: int = 0) -> float:
    """The placement predictor's uncorrected TTFT (``predicted-latency``'s ``ttft_raw_s``) for a
    fresh prompt of ``tokens`` tokens on the fleet's one endpoint, with ``ahead`` requests of
    the same size sent before it that have not produced their first token yet (a burst)."""
    fleet = Fleet.from_config(parse_config(fleet_text))
    st = state(inflight=ahead, pending_prefill=ahead, pending_prefill_tokens=ahead * tokens,
               pending_prefill_sq=ahead * tokens * tokens)
    snap = snapshot(fleet, {fleet.endpoints[0].name: st})
    c = cycle(profile(model=fid.MODEL, prompt_tokens=tokens, max_output_tokens=1), snap)
    list(plugin("predicted-latency").score(c, list(snap.endpoints)))
    return float(c.annotations[fleet.endpoints[0].name]["ttft_raw_s"])


def held_out_errors(
    fleet_text: str, hw: HardwareProfile, measured: list[tuple[int, float]], burst: list[float]
) -> dict[str, Any]:
    """The held-out prediction errors of the profile ``hw`` that ``fleet_text``'s endpoint runs:
    ``median``, ``each`` and ``predicted_ms`` are the placement predictor's
    (:func:`predicted_ttft_s`; each lone point, then rank ``k`` of the burst with the ``k``
    requests sent before it pending) — the issue's target. The predictor sees only the
    requests sent before a request, while vLLM answers the first ranks of a burst late
    because of the requests sent *after* them: a follower's intake delays the first answer,
    and the second is prefilled in one step with the third (docs/benchmarks.md, session 22).
    ``physics_burst`` holds, beside it, the burst as the physics model predicts it told the
    whole burst (:func:`~inferplane.physics.calibration.predict_burst_s`: the fit calls it; the
    emulator runs the same front-end model itself): its ranks' errors (signed), and the median
    absolute error of the six cases with those ranks in place of the predictor's.
    ``each_signed`` is the predictor's errors signed, ``(predicted - measured) / measured``,
    beside ``each`` (absolute)."""
    size, tokens = HELD_OUT_BURST
    predicted = [predicted_ttft_s(fleet_text, n) for n, _ in measured]
    predicted += [predicted_ttft_s(fleet_text, tokens, k) for k in range(size)]
    truth = [t for _, t in measured] + burst
    signed_all = [(p - t) / t for p, t in zip(predicted, truth, strict=True)]
    errors = [abs(e) for e in signed_all]
    physics = predict_burst_s(Roofline(hw, get_model(fid.MODEL), 1, "fp32"), size, tokens)
    signed = [(p - t) / t for p, t in zip(physics, burst, strict=True)]
    return {
        "median": statistics.median(errors),
        "each": [round(e, 3) for e in errors],
        "each_signed": [round(e, 3) for e in signed_all],
        "predicted_ms": [round(p * 1e3, 3) for p in predicted],
        "physics_burst": {
            "predicted_ms": [round(p * 1e3, 3) for p in physics],
            "each_signed": [round(e, 3) for e in signed],
            "median_with_it": statistics.median(errors[:len(measured)]
                                                + [abs(e) for e in signed]),
        },
    }


def refit_one_price(text: str) -> str:
    """The profile file ``text``'s own probe points fitted again with attention priced with
    the matmuls (``fit(..., attention=False)``: the fit before session 11), its front end
    refitted on the same bursts and loaded points, under the name ``PROFILE_NAME-one``: the
    side-by-side of ``--ab``, on one probe."""
    import yaml

    doc = yaml.safe_load(text)
    c = doc["calibration"]
    pre = [PrefillPoint(p["prompt_tokens"], p["cached_tokens"], p["ttft_s"]) for p in c["prefill"]]
    dec = [DecodePoint(d["batch"], d["context_tokens"], d["itl_s"]) for d in c["decode"]]
    bursts = [BurstPoint(b["size"], b["prompt_tokens"], tuple(b["ttft_s"])) for b in c["bursts"]]
    loaded = [LoadedPoint(p["batch"], p["context_tokens"], p["prompt_tokens"], p["ttft_s"])
              for p in c["loaded"]]
    mp = get_model(c["model_profile"])
    cal = fit(get_hardware(doc["hardware"]["base"]), mp, pre, dec,
              name=f"{PROFILE_NAME}-one", tp=c["tp"], precision=c["precision"],
              source="one-price refit (bench/calibration.py --ab)", attention=False)
    cal = fit_frontend(cal, mp, bursts, loaded, tp=c["tp"], precision=c["precision"])
    h = doc["hardware"]  # the speed spread is the probe's, not the fit's: kept as it was
    cal = dataclasses.replace(cal, hardware=dataclasses.replace(
        cal.hardware, speed_spread=tuple(h.get("speed_spread", ())),
        speed_spread_window_s=h.get("speed_spread_window_s", 0.0)))
    return dump_profile(cal, doc["hardware"]["base"], c)


def emulator_fleet(hardware: str, port: int, profile: Path | None) -> str:
    profiles = {"hardware_profiles": [str(profile)]} if profile is not None else {}
    return to_yaml(pool_fleet(
        port, **profiles,
        substrate={"name": "calibrated-cpu", "kind": "cpu", "hardware": hardware,
                   "region": "local", "cost": {"hourly_usd": 1}},
        endpoint_fields={"name": "emu-0", "emulation": {
            "block_size": fid.BLOCK_SIZE, "max_num_seqs": fid.MAX_NUM_SEQS,
            "num_gpu_blocks": fid.NUM_GPU_BLOCKS,
            "max_num_batched_tokens": fid.MAX_BATCHED_TOKENS}},
        models=[model(fid.MODEL, None, fid.MAX_MODEL_LEN, precision="fp32")],
    ))


@contextlib.contextmanager
def emulator(
    hardware: str, profile: Path | None, work: Path, time_scale: float = 1.0
) -> Iterator[str]:
    """``inferplane emulate`` for one endpoint on ``hardware``, in its own process."""
    port = free_port()
    fleet = work / f"fleet-{hardware}.yaml"
    fleet.write_text(emulator_fleet(hardware, port, profile))
    proc = Proc(["-m", "inferplane.cli", "emulate", "--config", str(fleet),
                 "--time-scale", str(time_scale)], work / f"emulator-{hardware}.log")
    try:
        url = f"http://127.0.0.1:{port}"
        proc.wait_http(f"{url}/health")
        yield url
    finally:
        proc.stop()


def share(total: int, parts: int, i: int) -> int:
    """Part ``i`` (0-based) of ``total`` spread over ``parts`` as evenly as it goes, the
    earlier parts taking the remainder: how many real workload rounds follow the probe's
    round ``i`` (until session 22 also how many held-out repeats)."""
    per, extra = divmod(total, parts)
    return per + (i < extra)


def workload_stats(results: list[WorkloadResult]) -> dict[str, float]:
    return {
        f"{metric}_p{q}": statistics.median(_pct(getattr(r, f"{metric}_s"), q) for r in results)
        for metric in ("ttft", "tpot")
        for q in (50, 90)
    }


def pooled_stats(results: list[WorkloadResult]) -> dict[str, float]:
    """P50 and P90 of TTFT and time per output token over every request of every round (the
    percentiles of the whole workload, where :func:`workload_stats` takes each round's and
    then their median)."""
    return {
        f"{metric}_p{q}": _pct([x for r in results for x in getattr(r, f"{metric}_s")], q)
        for metric in ("ttft", "tpot")
        for q in (50, 90)
    }


def real_vs_real(
    results: list[WorkloadResult],
    stats: Callable[[list[WorkloadResult]], dict[str, float]] = workload_stats,
) -> dict[str, float] | None:
    """The control: the real engine's rounds split into two interleaved halves (even and odd
    rounds), and the signed gap of the odd half's ``stats`` to the even half's, on the four
    metrics the emulator is held to. None with < 2 rounds.

    It is not the noise of the test's statistic, and understates it: it compares about half
    the real rounds with the other half (8 with 7 of 15), where the test compares all the real
    rounds with the emulator's (15 with 6); and the halves alternate within each probe round's
    rounds, seconds apart, where the emulator's rounds run minutes after the real ones (after
    the probe), so a drift of the host's speed from minute to minute is not in it."""
    if len(results) < 2:
        return None
    even, odd = stats(results[0::2]), stats(results[1::2])
    return {k: (odd[k] - v) / v for k, v in even.items()}


def per_level_ms(
    results: list[WorkloadResult], levels: tuple[int, ...] = (1, 2, 4)
) -> dict[str, list[float | None]]:
    """Per concurrency level: median TTFT (ms, rounded to 0.1) and time per output token (ms,
    rounded to 0.01), each the median over rounds of that round's median. Samples are picked
    by the level recorded with each (a stream with no TPOT leaves no TPOT sample, so slicing
    by position would mix levels); a round with no sample at a level is left out, and a level
    with none in any round reads None."""

    def median_ms(samples: list[tuple[list[float], list[int]]], c: int,
                  digits: int) -> float | None:
        medians = [statistics.median(picked) for values, at in samples
                   if (picked := [v for v, lv in zip(values, at, strict=True) if lv == c])]
        return round(statistics.median(medians) * 1e3, digits) if medians else None

    ttft = [(r.ttft_s, r.ttft_level) for r in results]
    tpot = [(r.tpot_s, r.tpot_level) for r in results]
    return {f"c{c}": [median_ms(ttft, c, 1), median_ms(tpot, c, 2)] for c in levels}


def per_size_ms(
    results: list[WorkloadResult], levels: tuple[int, ...] = (1, 2, 4)
) -> dict[str, dict[str, float]]:
    """Per concurrency level and prompt size: median TTFT (ms, rounded to 0.1), the median over
    rounds of that round's median over the level's requests of that size. A level's median
    (:func:`per_level_ms`) falls between sizes — of 12 requests, 3 of each of 4 sizes, it is
    the mean of the 6th and 7th — and at concurrency 2 and 4 the closed loop's streams end
    together, so that its requests arrive as bursts (at 2: the 768- and 384-token prompts
    together, then the 128 and 32): by size, a gap shows which requests it sits on. A size
    with no sample at a level in a round is left out of that round; levels and sizes with
    none are absent."""
    out: dict[str, dict[str, float]] = {}
    for c in levels:
        by_size: dict[int, list[float]] = {}
        for r in results:
            picked: dict[int, list[float]] = {}
            for v, lv, n in zip(r.ttft_s, r.ttft_level, r.ttft_prompt, strict=True):
                if lv == c:
                    picked.setdefault(n, []).append(v)
            for n, vs in picked.items():
                by_size.setdefault(n, []).append(statistics.median(vs))
        if by_size:
            out[f"c{c}"] = {str(n): round(statistics.median(ms) * 1e3, 1)
                            for n, ms in sorted(by_size.items())}
    return out


def compare(
    real_url: str,
    work: Path,
    *,
    rounds: int = 3,
    requests: int = 12,
    repeats: int = 5,
    profiles: tuple[str, ...] = ("table", "calibrated"),
    engine_pid: int | None = None,
    real_rounds: int | None = None,
) -> dict[str, Any]:
    """Steps 1-3 of the module docstring against the engine at ``real_url``. With
    ``engine_pid`` (the real vLLM's API server, started here) the whole comparison runs with
    the engine and its front end on separate cores (``tests.fidelity.cores.split_cores``).
    ``real_rounds`` None: as many as ``rounds``."""
    if real_rounds is None:
        real_rounds = rounds
    if rounds < 1 or real_rounds < 1:
        raise ValueError(f"rounds and real_rounds must be 1 or more ({rounds}, {real_rounds})")
    with contextlib.ExitStack() as stack:
        cores = stack.enter_context(split_cores(engine_pid)) if engine_pid is not None else {}
        out = _compare(real_url, work, rounds=rounds, requests=requests, repeats=repeats,
                       profiles=profiles, real_rounds=real_rounds)
    out["cores"] = cores
    return out


def _compare(
    real_url: str,
    work: Path,
    *,
    rounds: int,
    requests: int,
    repeats: int,
    profiles: tuple[str, ...],
    real_rounds: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {"real_smooth_after_warm_up": asyncio.run(warm_up(real_url))}
    held = HeldOut(HELD_OUT, HELD_OUT_BURST)
    real_runs: list[WorkloadResult] = []
    out["load_per_round"] = []

    out["real_round_after"] = []  # the probe round each real round followed (-1: after all)
    t0 = time.monotonic()
    out["real_round_at_s"] = []  # when each real round began, s from the start

    async def real_round(after: int = -1) -> None:
        out["real_round_after"].append(after)
        out["real_round_at_s"].append(round(time.monotonic() - t0, 1))
        real_runs.append(await run_workload(real_url, fid.MODEL, requests_per_level=requests))
        out["load_per_round"].append(round(os.getloadavg()[0], 2))

    per_round = held_out_per_round(repeats)
    out["held_out_per_round"] = per_round  # the samples' round boundaries, for offline reading

    async def between(i: int) -> None:
        # the held-out requests and the real engine's workload rounds between the probe's
        # rounds: a host that runs the engine faster or slower for a minute moves the fit, the
        # held-out points and the workload alike (it moved one against the other by up to
        # ±40 % when they came one after the other; docs/benchmarks.md, session 9)
        await held.measure(real_url, per_round)
        for _ in range(share(real_rounds, repeats, i)):
            await real_round(i)

    text, summary = asyncio.run(calibrate_endpoint(
        real_url, fid.MODEL, model_profile=fid.MODEL, base="cpu", name=PROFILE_NAME,
        precision="fp32", prompt_tokens=SWEEP, batches=(1, 2, 4), repeats=repeats,
        between_rounds=between,
    ))
    for _ in range(real_rounds - len(real_runs)):  # more workload rounds than probe rounds
        asyncio.run(real_round())
    profile = work / "profile.yaml"
    profile.write_text(text)
    out["fit"] = summary.splitlines()[-1]
    out["fit_table"] = summary.splitlines()[:-1]
    out["profile"] = text
    hardware = {"table": (get_hardware("cpu"), None, "cpu"),
                "calibrated": (load_hardware_profile(profile), profile, PROFILE_NAME)}
    if "one-price" in profiles:  # --ab: the same probe fitted as before session 11
        one = work / "profile-one-price.yaml"
        one.write_text(refit_one_price(text))
        hardware["one-price"] = (load_hardware_profile(one), one, f"{PROFILE_NAME}-one")
        out["profile_one_price"] = one.read_text()

    measured, burst = held.result()
    out["held_out_ttft_ms"] = {tokens: round(t * 1e3, 3) for tokens, t in measured}
    out["held_out_burst_ms"] = [round(t * 1e3, 3) for t in burst]
    out["held_out_samples_ms"] = {  # every held-out request's TTFT, in the order sent
        "alone": {n: [round(s.ttft_s * 1e3, 3) for s in held.cold[n]] for n in HELD_OUT},
        "burst": [[round(t * 1e3, 3) for t in r] for r in held.runs],
    }
    out["prediction_error"] = {
        name: held_out_errors(emulator_fleet(hardware[name][2], 9, hardware[name][1]),
                              hardware[name][0], measured, burst)
        for name in profiles
    }

    # the emulators' rounds after the fit (they run the fitted profile); an emulator's
    # rounds agree within a few % (its timing is the model's), so they need no interleaving
    out["workload"], out["gaps"] = {}, {}
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(emulator(hardware[name][2], hardware[name][1], work))
                for name in profiles}
        for url in urls.values():
            asyncio.run(warm_up(url))
        emu_runs: dict[str, list[WorkloadResult]] = {name: [] for name in profiles}
        out["emulator_round_at_s"] = []
        for _ in range(rounds):
            out["emulator_round_at_s"].append(round(time.monotonic() - t0, 1))
            for name, url in urls.items():
                res = asyncio.run(run_workload(url, fid.MODEL, requests_per_level=requests))
                emu_runs[name].append(res)
                time.sleep(0.2)
            out["load_per_round"].append(round(os.getloadavg()[0], 2))
    real = workload_stats(real_runs)
    out["workload"]["real"] = real
    out["pooled"], out["pooled_gaps"] = {"real": pooled_stats(real_runs)}, {}
    for name in profiles:
        s = out["workload"][f"emulator ({name})"] = workload_stats(emu_runs[name])
        out["gaps"][name] = {k: (s[k] - v) / v for k, v in real.items()}  # signed
        p = out["pooled"][name] = pooled_stats(emu_runs[name])
        out["pooled_gaps"][name] = {k: (p[k] - v) / v for k, v in out["pooled"]["real"].items()}
    out["control"] = real_vs_real(real_runs)
    out["control_pooled"] = real_vs_real(real_runs, pooled_stats)
    out["samples_ms"] = {  # every round's raw samples, to recompute any statistic offline
        name: [{"ttft": [round(x * 1e3, 3) for x in r.ttft_s], "ttft_level": r.ttft_level,
                "ttft_prompt": r.ttft_prompt,
                "tpot": [round(x * 1e3, 4) for x in r.tpot_s], "tpot_level": r.tpot_level}
               for r in runs]
        for name, runs in (("real", real_runs), *emu_runs.items())
    }
    out["per_round"] = {
        "real": [workload_stats([r]) for r in real_runs],
        **{name: [workload_stats([r]) for r in runs] for name, runs in emu_runs.items()},
    }
    out["per_level_ms"] = {
        "real": per_level_ms(real_runs),
        **{name: per_level_ms(runs) for name, runs in emu_runs.items()},
    }
    out["per_size_ms"] = {
        "real": per_size_ms(real_runs),
        **{name: per_size_ms(runs) for name, runs in emu_runs.items()},
    }
    sent = sum(len(r.ttft_s) for r in real_runs)
    out["real_bursts"] = sum(r.bursts for r in real_runs)
    out["real_streams"] = sent
    out["real_starved"] = out["real_bursts"] * 10 > sent
    return out


def table(res: dict[str, Any]) -> str:
    lines = ["| | " + " | ".join(("TTFT P50", "TTFT P90", "TPOT P50", "TPOT P90")) + " |",
             "|---|---|---|---|---|"]
    for name, s in res["workload"].items():
        cells = []
        for k in ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90"):
            cell = f"{s[k] * 1e3:.2f} ms"
            profile = name[len("emulator ("):-1] if name.startswith("emulator") else None
            if profile is not None:
                cell += f" ({res['gaps'][profile][k]:+.0%})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    pe = res["prediction_error"]
    lines.append("")
    lines.append("TTFT prediction on held-out prompts "
                 f"({', '.join(map(str, HELD_OUT))} tokens alone, then each rank of a burst of "
                 f"{HELD_OUT_BURST[0]} x {HELD_OUT_BURST[1]}), median abs error and each signed: "
                 + ", ".join(f"{k} {v['median']:.1%} {v['each_signed']}"
                             for k, v in pe.items()))
    lines.append(f"measured ms: alone {res['held_out_ttft_ms']}, burst {res['held_out_burst_ms']}")
    lines.append("the burst told whole to the physics model (predict_burst_s; the predictor sees "
                 "only the requests before each): " + ", ".join(
                     f"{k} ranks {v['physics_burst']['each_signed']} (median of six with them "
                     f"{v['physics_burst']['median_with_it']:.1%})" for k, v in pe.items()))
    if res.get("control"):
        lines.append(f"control, the real engine against itself ({len(res['per_round']['real'])}"
                     " rounds: odd rounds vs even rounds): " + ", ".join(
                         f"{k} {v:+.1%}" for k, v in res["control"].items()))
        lines.append("pooled percentiles (every request of every round), emulator vs real: "
                     + "; ".join(f"{name} " + ", ".join(f"{k} {v:+.1%}" for k, v in g.items())
                                 for name, g in res["pooled_gaps"].items())
                     + "; control " + ", ".join(
                         f"{k} {v:+.1%}" for k, v in res["control_pooled"].items()))
    lines.append(f"fit: {res['fit']}")
    lines.append(f"cores: {res['cores'] or 'shared (not pinned)'}")
    lines.append(f"real engine: {res['real_bursts']} of {res['real_streams']} streams in one burst"
                 + (" (starved: latencies measure the machine)" if res["real_starved"] else ""))
    return "\n".join(lines)


def start_real_engine(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    if not fid.VENV_PYTHON.exists():
        raise SystemExit(f"no fidelity venv at {fid.VENV}: run scripts/fidelity/setup.sh")
    subprocess.run([str(fid.VENV_PYTHON), str(ROOT / "scripts/fidelity/build_tiny_model.py"),
                    str(fid.MODEL_DIR)], check=True, timeout=300, cwd=ROOT)
    port, kv_port = free_port(), free_port()
    with (work / "vllm.log").open("wb") as log:
        proc = subprocess.Popen(fid.vllm_command(fid.MODEL_DIR, port, kv_port), stdout=log,
                                stderr=subprocess.STDOUT, env=fid.vllm_env(), cwd=work,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + fid.VLLM_START_TIMEOUT_S
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"vLLM did not start; see {work / 'vllm.log'}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", help="a running real engine (default: start the fidelity one)")
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--real-rounds", type=positive_int, help="the real engine's workload rounds "
                    "(default: --rounds); with 2 or more, the real engine's odd rounds against "
                    "its even rounds are the control (real_vs_real)")
    ap.add_argument("--requests", type=positive_int, default=12,
                    help="requests per concurrency level")
    ap.add_argument("--repeats", type=positive_int, default=5, help="probe repeats per point")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "calibration")
    ap.add_argument("--truth", type=Path, help="self-check: instead of a real engine, calibrate "
                    "`inferplane emulate` running this profile file (known factors)")
    ap.add_argument("--truth-time-scale", type=float, default=0.25,
                    help="its time scale (< 1: slow motion, so that the machine's load is a "
                    "smaller share of every latency)")
    ap.add_argument("--ab", action="store_true", help="instead of the table, the same probe "
                    "fitted with attention priced with the matmuls (the fit before session "
                    "11), its emulator in alternate rounds with the calibrated one's")
    ap.add_argument("--shared-cores", action="store_true", help="leave the engine it starts "
                    "unpinned (default: engine core and worker on the worker's cores, API server "
                    "and client on the rest; tests/fidelity/cores.py)")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    proc = None
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        try:
            if a.truth is not None:
                name = load_hardware_profile(a.truth).name
                url = stack.enter_context(emulator(name, a.truth.resolve(), work,
                                                   a.truth_time_scale))
            elif a.endpoint is None:
                proc, url = start_real_engine(work)
            else:
                url = a.endpoint
            load_before = os.getloadavg()[0]
            res = compare(url, work, rounds=a.rounds, requests=a.requests, repeats=a.repeats,
                          real_rounds=a.real_rounds,
                          profiles=("calibrated", "one-price") if a.ab
                          else ("table", "calibrated"),
                          engine_pid=None if proc is None or a.shared_cores else proc.pid)
        finally:
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, 15)
                proc.wait(30)
    res["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                      "load_1m_before": round(load_before, 2),
                      "load_1m_after": round(os.getloadavg()[0], 2)}
    res["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    (a.out / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(table(res))
    print(f"machine: {res['machine']}; {res['date']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
