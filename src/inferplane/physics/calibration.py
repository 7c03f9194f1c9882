"""Calibrated hardware profiles: fit the roofline's factors to measurements of a live engine.

The vendor table (``physics.hardware``) covers known devices with factors fitted to published
vLLM numbers. Anything else — new inference silicon, an LPDDR-heavy card, a CPU path, or a known
device behind an engine that behaves differently — gets its profile by measuring an engine
(``inferplane calibrate``, ``physics.probe``) and fitting five factors of the roofline
(``physics.roofline``) to what it measured:

* ``1 / compute_efficiency`` and ``1 / bandwidth_efficiency`` (how far below peak the engine runs
  compute-bound and memory-bound work),
* ``step_overhead_s`` (every step), ``seq_overhead_s`` (every sequence that produces a token in a
  step) and ``request_overhead_s`` (once per request, before its first token),
* ``context_token_s`` (every KV token the decoding sequences attend to, every step), only when
  the decode points hold at least two context lengths per sequence (with one, ``K`` is the batch
  times a constant and the column is ``seq_overhead_s``'s; it is then held at 0),
* ``attention_cost_factor`` (attention's FLOPs priced apart from the matmuls'), as the seventh
  unknown ``attn / ce``, only when the prefill points hold at least three distinct (new,
  cached) sizes: with two, a line through them cannot tell the prompt's length squared from
  its length; the factor is then kept at the base profile's.

With the regime of every measurement fixed (compute- or memory-bound under the current factors),
each measured time is *linear* in those seven unknowns:

    ttft(P, C) = request + step + seq + comm
                 + [compute] (F_lin × (1/ce) + F_attn × (attn/ce)) / peak
                 + [memory]  B / bw × (1/be)
    itl(D, K)  = step + D seq + K ctx + comm
                 + [compute] (F_lin × (1/ce) + F_attn × (attn/ce)) / peak
                 + [memory]  B / bw × (1/be)

(``F_lin``: the matmuls' FLOPs, ``F_attn``: attention's at a factor of 1, ``B``: bytes of the
step, exactly as ``Roofline.step_time_s`` counts them). The fit
solves that system by least squares on *relative* errors (each row divided by its measurement), with
a weak prior pulling ``1/ce`` and ``1/be`` towards the table's values (so a direction the probe
cannot see — a tiny model's weight reads, say — stays where the table put it), drops any overhead
that comes out negative, re-derives the regimes and repeats until they no longer change. An
efficiency that comes out above 1 means the table's peak is too low for this machine: the peak is
raised to what was achieved and the efficiency set to 1.

A profile file (YAML, ``kind: inferplane/hardware-profile``) holds the fitted hardware profile and
the evidence: every probe point with its measured and fitted time and the fit's error. Fleet files
name such files under ``hardware_profiles`` and their substrates use the profile's ``name``. A
calibrated profile holds for the model it was probed with (``calibration.model_profile``): the
factors are fitted to that model's steps, and a model of another size moves the FLOPs, bytes and
attention pairs of a step in proportions the probe never saw (`Fleet.from_config` logs a warning
when an endpoint serves another model on it).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inferplane.errors import ConfigError
from inferplane.physics.frontend import FrontEnd
from inferplane.physics.hardware import HARDWARE, HardwareProfile
from inferplane.physics.models import ModelProfile
from inferplane.physics.roofline import Roofline
from inferplane.yamlio import read_yaml

PROFILE_KIND: Final = "inferplane/hardware-profile"
PROFILE_VERSION: Final = 1
#: Weights of the priors that keep ``1/compute_efficiency`` and ``1/bandwidth_efficiency`` at the
#: table's values where the probe cannot see them, relative to one measurement's squared relative
#: error. Compute: a 1,000x departure costs as much as one point off by 0.1 % — the prefill sweep
#: sees it over a 48x range of new tokens, and a CPU engine running a tiny model in Python is
#: ~1,000x below the table's peak per prompt token (at 1e-6, a 100x departure = one point off by
#: 10 %, the prior outweighed the sweep: a known engine's 768-token prefill came out 37 % short).
#: Bandwidth: a 100x departure costs one point off by 10 % — a step's bytes are mostly the weights,
#: the same every step, so this direction is all but collinear with ``step_overhead_s`` (freed,
#: the fit moved 2.9 ms of a known 4 ms step into weight reads of the tiny model).
#: Attention's ``attn / ce`` gets the compute prior's weight, towards the base profile's factor.
PRIOR_WEIGHTS: Final = (1e-12, 1e-6)
#: Attention is priced apart from the matmuls (``attention_cost_factor`` fitted) only when the
#: fit with one price misses the points by more than this (root mean square of the relative
#: errors; the fidelity vLLM: 8-10 %, its prefill sweep a curve the line misses at both ends),
#: and the fit with two prices brings that under ``SPLIT_GAIN`` of it: on an engine whose
#: attention runs at its matmuls' efficiency the one price fits exactly, and a free seventh
#: unknown would only trade with the others (the known GPU machines of the tests).
SPLIT_MIN_ERROR: Final = 0.01
SPLIT_GAIN: Final = 0.8
#: The prior's weight on ``1/compute_efficiency`` in the fit with two prices, towards the
#: one-price fit's value (infinite: held there).
SPLIT_CE_WEIGHT: Final = 0.03
_MAX_ROUNDS: Final = 20
_FRONTEND_GRID: Final = 24  # steps of the search for the front end's three factors, per axis
_FRONTEND_REFINE: Final = 12  # then rounds of a local search, each at half the step


@dataclass(frozen=True, slots=True)
class PrefillPoint:
    """One measured time to first token: ``prompt_tokens`` in all, ``cached_tokens`` of them
    served from the prefix cache (median over repeats)."""

    prompt_tokens: int
    cached_tokens: int
    ttft_s: float


@dataclass(frozen=True, slots=True)
class DecodePoint:
    """One measured inter-token latency with ``batch`` sequences decoding together, each holding
    ``context_tokens`` KV tokens (median over the steady part of the streams)."""

    batch: int
    context_tokens: int
    itl_s: float


@dataclass(frozen=True, slots=True)
class BurstPoint:
    """``size`` one-token requests of ``prompt_tokens`` tokens sent at once: their TTFTs in
    order of arrival (each rank the median over repeats)."""

    size: int
    prompt_tokens: int
    ttft_s: tuple[float, ...]

    @property
    def spacing_s(self) -> float:
        """Mean time between consecutive first tokens: (last − first) ÷ (size − 1)."""
        return (self.ttft_s[-1] - self.ttft_s[0]) / (self.size - 1) if self.size > 1 else 0.0


@dataclass(frozen=True, slots=True)
class LoadedPoint:
    """TTFT of a one-token request of ``prompt_tokens`` tokens sent while ``batch`` streams
    decode, each holding about ``context_tokens`` KV tokens (median over repeats)."""

    batch: int
    context_tokens: int
    prompt_tokens: int
    ttft_s: float


@dataclass(frozen=True, slots=True)
class Calibration:
    """A fitted profile and how well it reproduces the probe."""

    hardware: HardwareProfile
    prefill: tuple[tuple[PrefillPoint, float], ...]  # (measured, fitted)
    decode: tuple[tuple[DecodePoint, float], ...]
    bursts: tuple[tuple[BurstPoint, tuple[float, ...]], ...] = ()
    loaded: tuple[tuple[LoadedPoint, float], ...] = ()
    #: each prompt length's cold prefill right after a stream (measured, fitted:
    #: :func:`fit_after_stream`)
    after_stream: tuple[tuple[PrefillPoint, float], ...] = ()

    @property
    def errors(self) -> list[float]:
        """Relative error of the fit at every probe point."""
        out = [abs(f - p.ttft_s) / p.ttft_s for p, f in self.prefill]
        out += [abs(f - p.itl_s) / p.itl_s for p, f in self.decode]
        return out

    @property
    def median_error(self) -> float:
        return statistics.median(self.errors) if self.errors else 0.0

    @property
    def max_error(self) -> float:
        return max(self.errors, default=0.0)


def predict_ttft_s(
    r: Roofline, prompt_tokens: int, cached_tokens: int = 0, *, after_stream: bool = False
) -> float:
    """Time to first token of a lone request: request overhead + the front end's intake + one
    prefill step + the front end sending its first chunk. ``after_stream``: sent right after
    a stream ended (the step takes :func:`after_stream_extra_s` longer)."""
    new = max(1, prompt_tokens - cached_tokens)
    hw = r.hardware
    fixed = (hw.request_overhead_s + hw.frontend_request_s + hw.frontend_handoff_s
             + hw.frontend_token_s)
    step = r.step_time_s(new, prompt_tokens - new, 0, 0)
    return fixed + step + (after_stream_extra_s(hw, step) if after_stream else 0.0)


def after_stream_extra_s(hw: HardwareProfile, step_s: float) -> float:
    """What a step of ``step_s`` that prefills right after the engine decoded costs more
    (``HardwareProfile.after_stream_s`` + ``after_stream_factor`` × ``step_s``)."""
    return hw.after_stream_s + hw.after_stream_factor * step_s


#: A fitted after-stream cost whose median over the prompt lengths is under this share of the
#: cold TTFT is written as none (no ``after_stream_*`` in the file): session 25's AMD host
#: measured the fidelity vLLM's cold prefill after an 8-token stream +2.5 % (95 % CI +0.7 …
#: +4.5) and in the default order +1.3 % (−0.8 … +3.3) over after a one-token request
#: (``calibration-s25/after_stream_stats.txt``), differences of this size that 15 tries a
#: length barely resolve; the fidelity vLLM's cost on session 27's Intel host, +20-25 %, is ten
#: times this.
AFTER_STREAM_FLOOR: Final = 0.02


def fit_after_stream(
    cal: Calibration,
    model: ModelProfile,
    after: Sequence[PrefillPoint],
    *,
    tp: int = 1,
    precision: str = "bf16",
) -> Calibration:
    """Fit ``after_stream_s`` and ``after_stream_factor`` (``HardwareProfile``) to the cold
    prefill points measured right after a stream (``after``) against the cold points of the
    same prompt lengths (``cal.prefill``, no cached tokens): each length's difference
    ``d = after − cold`` is taken as ``after_stream_s + after_stream_factor × step``, ``step``
    the fitted profile's prefill step for that length, by least squares on the differences
    relative to the cold times. A coefficient that comes out negative is held at 0 and the other
    refitted (a cost that does not grow with the prompt, or one that is all proportion). No
    term (both 0) when fewer than two lengths match, or when the fit's extra, median over the
    lengths, is under :data:`AFTER_STREAM_FLOOR` of the cold time (noise, or a faster prefill
    after a stream, which nothing here models)."""
    hw = dataclasses.replace(cal.hardware, after_stream_s=0.0, after_stream_factor=0.0)
    r = Roofline(hw, model, tp, precision)
    cold = {p.prompt_tokens: p.ttft_s for p, _ in cal.prefill if not p.cached_tokens}
    pairs = [(p, cold[p.prompt_tokens], r.step_time_s(max(1, p.prompt_tokens), 0, 0, 0))
             for p in after if p.prompt_tokens in cold]
    a = f = 0.0
    if len(pairs) >= 2:
        # rows (1/c, step/c) · (a, f) = (after − c)/c
        rows = [((1.0 / c, step / c), (p.ttft_s - c) / c) for p, c, step in pairs]
        a, f = _two_unknowns(rows)
        if a < 0.0:
            a, f = 0.0, max(_one_unknown([(x[1], y) for x, y in rows]), 0.0)
        elif f < 0.0:
            a, f = max(_one_unknown([(x[0], y) for x, y in rows]), 0.0), 0.0
        share = statistics.median((a + f * step) / c for _, c, step in pairs)
        if share < AFTER_STREAM_FLOOR:
            a = f = 0.0
    hw = dataclasses.replace(hw, after_stream_s=a, after_stream_factor=f)
    r = Roofline(hw, model, tp, precision)
    return dataclasses.replace(cal, hardware=hw, after_stream=tuple(
        (p, predict_ttft_s(r, p.prompt_tokens, after_stream=True)) for p in after))


def _two_unknowns(rows: Sequence[tuple[tuple[float, float], float]]) -> tuple[float, float]:
    """Least squares for ``x · (u, v) = y`` over ``rows`` of ``(x, y)``."""
    s11 = sum(x[0] * x[0] for x, _ in rows)
    s12 = sum(x[0] * x[1] for x, _ in rows)
    s22 = sum(x[1] * x[1] for x, _ in rows)
    b1 = sum(x[0] * y for x, y in rows)
    b2 = sum(x[1] * y for x, y in rows)
    det = s11 * s22 - s12 * s12
    if abs(det) <= 1e-12 * s11 * s22:  # one direction only (every step the same)
        return _one_unknown([(x[0], y) for x, y in rows]), 0.0
    return (b1 * s22 - b2 * s12) / det, (s11 * b2 - s12 * b1) / det


def _one_unknown(rows: Sequence[tuple[float, float]]) -> float:
    """Least squares for ``x u = y`` over ``rows`` of ``(x, y)``."""
    sxx = sum(x * x for x, _ in rows)
    return sum(x * y for x, y in rows) / sxx if sxx > 0 else 0.0


def frontend_wait_s(batch: int, token_s: float, itl_s: float) -> float:
    """Expected wait of a request arriving at a random moment behind the chunks of ``batch``
    decoding streams: every step (``itl_s``) gives the front end ``w = batch × token_s`` of
    work. Below saturation (``rho = w ÷ itl_s < 1``) it finds that work under way with
    probability ``rho`` and waits half of it; above, the front end is always busy and chunks
    coalesce (``physics.frontend``), so the wait tends to one whole ``w``:
    ``w × (min(rho, 1) + max(0, 1 − 1/rho)) ÷ 2``."""
    w = batch * token_s
    if w <= 0.0 or itl_s <= 0.0:
        return 0.0
    rho = w / itl_s
    return w * (min(rho, 1.0) + max(0.0, 1.0 - 1.0 / rho)) / 2.0


def predict_burst_s(r: Roofline, size: int, prompt_tokens: int) -> list[float]:
    """TTFT of each of ``size`` one-token requests of ``prompt_tokens`` tokens sent at once, in
    order: they queue at the front end (:class:`~inferplane.physics.frontend.FrontEnd`) for the
    first piece of their intakes, wait ``request_overhead_s``, queue for the second piece
    behind everything queued by then (the other requests' first pieces, chunks), are
    prefilled by the engine (one step for all that have arrived when it is free, each
    sequence's attention over its own prompt, as ``Roofline.step_time_s`` counts several
    chunks), and their first chunks queue at the front end behind whatever is still waiting
    there. The front end's work is taken in time order (hand-offs and step ends, a hand-off
    first at a tie)."""
    hw = r.hardware
    fe = FrontEnd(hw.frontend_request_s, hw.frontend_token_s, hw.frontend_handoff_s)
    # when each request's second piece queues: its first piece done (all arrived at 0), then
    # the parallel wait (``physics.frontend``: the hand-off comes after it)
    taken = [fe.intake(0.0) + hw.request_overhead_s for _ in range(size)]
    arrive: list[float] = []  # when each request reaches the engine, in order
    out: list[float] = []
    pairs = prompt_tokens * 0.5 * prompt_tokens  # one sequence's attention over its prompt
    free, i, k = 0.0, 0, 0  # engine free at; next request to prefill; next hand-off

    def hand_off_until(t: float) -> None:
        """Hand off, in order, the requests whose parallel wait is over by ``t``."""
        nonlocal k
        while k < size and taken[k] <= t:
            arrive.append(fe.handoff(taken[k]))
            k += 1

    while i < size:
        if len(arrive) <= i:  # the engine waits for request i: hand off the next one(s)
            hand_off_until(taken[k])
            continue
        start = max(free, arrive[i])
        hand_off_until(start)  # hand-offs before the step starts may join it
        j = i
        while j < len(arrive) and arrive[j] <= start:
            j += 1
        n = j - i
        free = start + r.step_time_s(n * prompt_tokens, 0, 0, 0, prefill_pairs=n * pairs)
        hand_off_until(free)  # hand-offs during the step come before its chunks
        done = fe.emit(free, n)
        out += [done] * n
        i = j
    return out


def predict_loaded_ttft_s(
    r: Roofline, batch: int, context_tokens: int, prompt_tokens: int
) -> float:
    """Time to first token of a request sent at a random moment while ``batch`` streams of
    ``context_tokens`` each decode: per-request overhead and intake, the wait behind the
    streams' chunks (:func:`frontend_wait_s`), half a decode step until the engine takes it, one
    step that prefills it beside the decodes (a prefill after decode steps: its
    :func:`after_stream_extra_s` too), and its chunk sent with theirs."""
    hw = r.hardware
    itl = predict_itl_s(r, batch, context_tokens)
    t = hw.frontend_token_s
    intake = hw.frontend_request_s + hw.frontend_handoff_s
    step = r.step_time_s(prompt_tokens, 0, batch, batch * context_tokens)
    return (
        hw.request_overhead_s + intake + frontend_wait_s(batch, t, itl)
        + itl / 2.0 + step + (after_stream_extra_s(hw, step) if batch else 0.0)
        + (batch + 1) * t
    )


def predict_itl_s(r: Roofline, batch: int, context_tokens: int) -> float:
    """Inter-token latency with ``batch`` sequences of ``context_tokens`` each decoding."""
    return r.step_time_s(0, 0, batch, batch * context_tokens)


def speed_spread(itl_per_round: Sequence[Sequence[float]]) -> tuple[float, ...]:
    """The engine's speed from one stretch of time to the next, as a decode probe sampled it
    (``HardwareProfile.speed_spread``): ``itl_per_round[p][i]`` is decode point ``p``'s
    inter-token latency in probe round ``i`` (every point measured in every round). Each is
    divided by its point's median over the rounds (what the fit takes as the point's time),
    then by the median of those ratios in its round, so that neither the points' own
    differences nor a drift of the host's speed from one round to the next (minutes apart:
    the workload's rounds compare within one) enter it — what is left is how much slower or
    faster one point's stream ran than the others of its round. Sorted; empty with fewer than
    two points or two rounds (nothing to compare)."""
    if len(itl_per_round) < 2:
        return ()
    rounds = len(itl_per_round[0])
    if rounds < 2 or any(len(p) != rounds for p in itl_per_round):
        return ()
    if min(t for p in itl_per_round for t in p) <= 0:
        raise ValueError("measured times must be > 0")
    ratios = [[t / statistics.median(p) for t in p] for p in itl_per_round]
    out: list[float] = []
    for i in range(rounds):
        column = [r[i] for r in ratios]
        typical = statistics.median(column)
        out += [x / typical for x in column]
    return tuple(sorted(out))


def fit(
    base: HardwareProfile,
    model: ModelProfile,
    prefill: Sequence[PrefillPoint],
    decode: Sequence[DecodePoint],
    *,
    name: str,
    tp: int = 1,
    precision: str = "bf16",
    source: str = "calibrated",
    attention: bool = True,
) -> Calibration:
    """Fit ``base``'s factors to the measurements (see the module docstring). ``attention``
    False: attention always priced with the matmuls (the fit before session 11)."""
    if len(prefill) < 2 or not decode:
        raise ValueError("a fit needs at least two prefill points and one decode point")
    if any(p.ttft_s <= 0 for p in prefill) or any(d.itl_s <= 0 for d in decode):
        raise ValueError("measured times must be > 0")
    start = dataclasses.replace(
        base, name=name, source=source, request_overhead_s=base.request_overhead_s
    )
    hw = _fit_once(start, model, prefill, decode, tp, precision, split=False)
    # attention priced apart from the matmuls: only where the sweep holds three sizes or more,
    # and kept only where it explains what the one price cannot (a curve in the sweep)
    if attention and len({(max(1, p.prompt_tokens - p.cached_tokens), p.cached_tokens)
                          for p in prefill}) >= 3:
        one = _rms_error(hw, model, prefill, decode, tp, precision)
        if one > SPLIT_MIN_ERROR:
            # from the one-price fit, its 1/ce held: the matmuls' price stays where the line
            # put it and only attention's is fitted (both free, the pair is all but unidentified
            # on a sweep this short: across six probes of one engine ce ran 8e-4-0.15 and the
            # factor 8.5-1,990, at one price of attention; another model's prefill, all matmuls,
            # then moved 7.8x between probes)
            apart = _fit_once(hw, model, prefill, decode, tp, precision, split=True,
                              ce_weight=SPLIT_CE_WEIGHT)
            if _rms_error(apart, model, prefill, decode, tp, precision) < SPLIT_GAIN * one:
                hw = apart
    r = Roofline(hw, model, tp, precision)
    return Calibration(
        hardware=hw,
        prefill=tuple((p, predict_ttft_s(r, p.prompt_tokens, p.cached_tokens)) for p in prefill),
        decode=tuple((d, predict_itl_s(r, d.batch, d.context_tokens)) for d in decode),
    )


def fit_frontend(
    cal: Calibration,
    model: ModelProfile,
    bursts: Sequence[BurstPoint],
    loaded: Sequence[LoadedPoint] = (),
    *,
    tp: int = 1,
    precision: str = "bf16",
) -> Calibration:
    """Split the fitted per-request time ``R`` into the front end's serialised work and the
    rest, so that lone-request predictions do not change (``R = request_overhead_s +
    frontend_request_s + frontend_handoff_s + frontend_token_s``): the triple
    (``frontend_request_s``, ``frontend_handoff_s``, ``frontend_token_s``) on a grid over
    ``s + h + t <= R``, then a local search around the best point at ever half the step, whose
    predictions — :func:`predict_burst_s` for every rank of every burst,
    :func:`predict_loaded_ttft_s` for the loaded points — fit the measurements best (least
    squares on relative errors).

    A burst shows the intake's two pieces: the first request's second piece (``h``) queues
    after its parallel wait, behind the first pieces (``s``) queued by then (all of them when
    the wait is shorter than ``(N − 1) s``), so the first answer comes up to ``(N − 1) s`` late
    and each other one's ``h`` when its own wait ends or behind the ``h`` ahead of it, whichever
    is later (``h`` apart while the waits end first; together, when they reach the engine
    during its step); their first chunks wait behind the intakes still queued. A request
    beside decoding streams shows ``t``. An intake of one piece is kept in ``s`` (with
    ``s = 0`` the bursts could not tell it from ``h``). Without bursts of two or more requests
    and without loaded points the profile is returned as it is.
    """
    usable = [b for b in bursts if b.size > 1]
    if not usable and not loaded:
        return cal
    hw = cal.hardware
    total = (hw.request_overhead_s + hw.frontend_request_s + hw.frontend_handoff_s
             + hw.frontend_token_s)

    def split(s: float, h: float, t: float) -> HardwareProfile:
        return dataclasses.replace(hw, frontend_request_s=s, frontend_handoff_s=h,
                                   frontend_token_s=t,
                                   request_overhead_s=max(total - s - h - t, 0.0))

    def loss(r: Roofline) -> float:
        err = 0.0
        for b in usable:
            for want, got in zip(b.ttft_s, predict_burst_s(r, b.size, b.prompt_tokens),
                                 strict=True):
                err += ((got - want) / want) ** 2
        for p in loaded:
            got = predict_loaded_ttft_s(r, p.batch, p.context_tokens, p.prompt_tokens)
            err += ((got - p.ttft_s) / p.ttft_s) ** 2
        return err

    costs: dict[tuple[float, float, float], float] = {}

    def cost(sht: tuple[float, float, float]) -> float:
        if sht not in costs:
            costs[sht] = loss(Roofline(split(*sht), model, tp, precision))
        return costs[sht]

    n = _FRONTEND_GRID
    step = total / n
    grid = [(step * i, step * j, step * k) for i in range(n + 1) for j in range(n + 1 - i)
            for k in range(n + 1 - i - j)]
    best = min(grid, key=cost)
    for _ in range(_FRONTEND_REFINE):  # the neighbours at the step, then at half of it
        near = [(best[0] + step * i, best[1] + step * j, best[2] + step * k)
                for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)]
        best = min([best, *(x for x in near if min(x) >= 0 and sum(x) <= total * (1 + 1e-12))],
                   key=cost)
        step /= 2
    if best[0] <= step and best[1] > best[0]:
        # an intake of one piece is the same whichever piece holds it (bursts arrive at once):
        # keep it in the first, as profiles without ``frontend_handoff_s`` have it
        best = (best[1] + best[0], 0.0, best[2])
    hw = split(*best)
    r = Roofline(hw, model, tp, precision)
    return dataclasses.replace(
        cal,
        hardware=hw,
        bursts=tuple((b, tuple(predict_burst_s(r, b.size, b.prompt_tokens))) for b in bursts),
        loaded=tuple(
            (p, predict_loaded_ttft_s(r, p.batch, p.context_tokens, p.prompt_tokens))
            for p in loaded
        ),
    )


def achieved_peak(hw: HardwareProfile) -> HardwareProfile:
    """``hw`` with the peak FLOP/s its fit achieved as its peak: ``peak_flops`` (and
    ``fp8_peak_flops``) times ``compute_efficiency``, the efficiency then 1 — the same time for
    every step (the roofline divides by their product alone). What ``inferplane calibrate``
    writes for a CPU: the table's ``cpu`` peak is one server's (two 56-core Xeons with AMX,
    200 TFLOP/s), not the probed machine's, so a calibrated CPU profile that kept it claimed a
    GPU-class peak at an efficiency of ~0.06 %; the product is what the probe measured (in the
    table's BF16 units: ``peak_flops_for`` halves it for fp32)."""
    if hw.compute_efficiency >= 1.0:
        return hw
    ce = hw.compute_efficiency
    return dataclasses.replace(
        hw, peak_flops=hw.peak_flops * ce, compute_efficiency=1.0,
        fp8_peak_flops=hw.fp8_peak_flops * ce if hw.fp8_peak_flops is not None else None)


def _rms_error(
    hw: HardwareProfile, model: ModelProfile, prefill: Sequence[PrefillPoint],
    decode: Sequence[DecodePoint], tp: int, precision: str,
) -> float:
    """Root mean square of the relative errors of ``hw`` at every prefill and decode point."""
    r = Roofline(hw, model, tp, precision)
    errs = [(predict_ttft_s(r, p.prompt_tokens, p.cached_tokens) - p.ttft_s) / p.ttft_s
            for p in prefill]
    errs += [(predict_itl_s(r, d.batch, d.context_tokens) - d.itl_s) / d.itl_s for d in decode]
    return math.sqrt(sum(e * e for e in errs) / len(errs))


def _fit_once(
    hw: HardwareProfile, model: ModelProfile, prefill: Sequence[PrefillPoint],
    decode: Sequence[DecodePoint], tp: int, precision: str, *, split: bool,
    ce_weight: float = PRIOR_WEIGHTS[0],
) -> HardwareProfile:
    """The iterated least squares of the module docstring from ``hw``'s values; with
    ``split`` attention's FLOPs are priced apart (the seventh unknown), else at ``hw``'s
    ``attention_cost_factor``. ``ce_weight``: the prior's weight on ``1/compute_efficiency``
    towards ``hw``'s (infinite: held there)."""
    base = hw
    prior = {0: (1.0 / base.compute_efficiency, ce_weight),
             1: (1.0 / base.bandwidth_efficiency, PRIOR_WEIGHTS[1]),
             _ATTENTION: (base.attention_cost_factor / base.compute_efficiency, PRIOR_WEIGHTS[0])}
    previous: list[bool] | None = None
    held: dict[int, float] = {}  # unknowns held fixed: overheads at 0, efficiencies at the table
    if len({d.context_tokens for d in decode}) < 2:
        held[_CONTEXT] = 0.0  # one context per sequence: K ∝ batch, seq_overhead_s's column
    if not split:
        held[_ATTENTION] = 0.0
    if math.isinf(ce_weight):
        held[0] = prior.pop(0)[0]
    structural, held_under = dict(held), None
    for _ in range(_MAX_ROUNDS):
        r = Roofline(hw, model, tp, precision)
        rows, regimes = _rows(r, prefill, decode, split)
        if split and held_under is not None and regimes != held_under:
            # holds made while the points sat in other regimes (the first rounds run under the
            # table's, where a CPU's prefill is memory-bound and its FLOP columns are empty)
            # are released: with attention priced apart they stuck at the table's efficiency
            held, held_under = dict(structural), None
        x = _solve(rows, prior, held)
        if split and x[_ATTENTION] <= 0:  # no curve in this sweep: attention with the matmuls
            return _fit_once(base, model, prefill, decode, tp, precision, split=False)
        wrong = {i: (prior[i][0] if i in prior else 0.0) for i in range(_UNKNOWNS)
                 if x[i] <= 0 and i not in held}
        if wrong:  # a negative time or efficiency: noise, not physics; hold it and solve again
            held |= wrong
            held_under = regimes
            continue
        hw = _apply(hw, x, split)
        if regimes == previous:
            break
        previous = regimes
    return hw


# -- the linear system -----------------------------------------------------------------------
# Unknowns: x = [1/ce, 1/be, step_overhead_s, seq_overhead_s, request_overhead_s,
# context_token_s].
_UNKNOWNS: Final = 7
_CONTEXT: Final = 5
_ATTENTION: Final = 6  # attention_cost_factor / compute_efficiency


def _step_terms(
    r: Roofline, p: int, c: int, d: int, k: int
) -> tuple[float, float, float, bool, float, int]:
    """(matmul FLOPs / achievable-at-efficiency-1, attention FLOPs at a factor of 1 / the same,
    bytes / bandwidth-at-efficiency-1, compute-bound now?, known seconds (comm + layer
    latency), sequences producing a token)."""
    hw = r.hardware
    tokens = p + d
    pairs = p * (c + 0.5 * p) + k
    m = r.model
    peak = r.tp * hw.peak_flops_for(r.precision)
    lin_s = 2.0 * m.active_params * tokens / peak
    attn_s = 4.0 * m.layers * m.attention_width * pairs / peak
    kv_per_dev = r.kv_bytes_per_token / min(r.tp, m.num_kv_heads)
    bytes_s = (r.weight_bytes / r.tp + (c + k + tokens) * kv_per_dev) / hw.mem_bandwidth
    compute_s = (lin_s + attn_s * hw.attention_cost_factor) / hw.compute_efficiency
    memory_s = bytes_s / hw.bandwidth_efficiency
    step_total = r.step_time_s(p, c, d, k)
    seqs = d + (p > 0)
    known = (step_total - max(compute_s, memory_s) - hw.step_overhead_s
             - hw.seq_overhead_s * seqs - hw.context_token_s * k)
    return lin_s, attn_s, bytes_s, compute_s > memory_s, known, seqs


def _rows(
    r: Roofline, prefill: Sequence[PrefillPoint], decode: Sequence[DecodePoint], split: bool
) -> tuple[list[tuple[list[float], float]], list[bool]]:
    """One row per point; with ``split`` attention's FLOPs have their own column (the seventh
    unknown), else they join the matmuls' at the profile's current factor."""
    rows: list[tuple[list[float], float]] = []
    regimes: list[bool] = []
    factor = r.hardware.attention_cost_factor

    def compute(lin: float, attn: float, cb: bool) -> tuple[float, float]:
        if not cb:
            return 0.0, 0.0
        return (lin, attn) if split else (lin + attn * factor, 0.0)

    for pp in prefill:
        new = max(1, pp.prompt_tokens - pp.cached_tokens)
        lin, attn, b, cb, known, seqs = _step_terms(r, new, pp.prompt_tokens - new, 0, 0)
        regimes.append(cb)
        f, a = compute(lin, attn, cb)
        coef = [f, 0.0 if cb else b, 1.0, float(seqs), 1.0, 0.0, a]
        rows.append(([c / pp.ttft_s for c in coef], (pp.ttft_s - known) / pp.ttft_s))
    for dp in decode:
        kv = dp.batch * dp.context_tokens
        lin, attn, b, cb, known, seqs = _step_terms(r, 0, 0, dp.batch, kv)
        regimes.append(cb)
        f, a = compute(lin, attn, cb)
        coef = [f, 0.0 if cb else b, 1.0, float(seqs), 0.0, float(kv), a]
        rows.append(([c / dp.itl_s for c in coef], (dp.itl_s - known) / dp.itl_s))
    return rows, regimes


def _solve(
    rows: list[tuple[list[float], float]],
    prior: dict[int, tuple[float, float]],
    held: dict[int, float],
) -> list[float]:
    """Least squares with the priors (``prior[i] = (target, weight)``); unknowns in ``held``
    keep their given value, and so does an unknown that no row mentions (an overhead without
    the points to see it is 0, an efficiency stays at the table's)."""
    n = _UNKNOWNS
    ata = [[0.0] * n for _ in range(n)]
    atb = [0.0] * n
    for coef, y in rows:
        for i in range(n):
            atb[i] += coef[i] * y
            for j in range(n):
                ata[i][j] += coef[i] * coef[j]
    held = dict(held)
    for i in range(n):
        if i not in held and ata[i][i] == 0.0:
            held[i] = prior[i][0] if i in prior else 0.0
    for i, (target, weight) in prior.items():
        w = weight / (target * target)  # relative: a factor of 10 costs the same anywhere
        ata[i][i] += w
        atb[i] += w * target
    free = [i for i in range(n) if i not in held]
    # move the held unknowns' known contribution to the right-hand side
    rhs = [atb[i] - sum(ata[i][j] * v for j, v in held.items()) for i in free]
    sub = [[ata[i][j] for j in free] for i in free]
    sol = _gauss(sub, rhs)
    x = [held.get(i, 0.0) for i in range(n)]
    for k, i in enumerate(free):
        x[i] = sol[k]
    return x


def _gauss(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve ``a x = b`` (small, symmetric positive definite) by Gaussian elimination with
    partial pivoting; a singular direction is solved as 0."""
    n = len(b)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[piv] = m[piv], m[col]
        if abs(m[col][col]) < 1e-300:
            continue
        for r in range(n):
            if r != col and m[r][col] != 0.0:
                f = m[r][col] / m[col][col]
                for c in range(col, n + 1):
                    m[r][c] -= f * m[col][c]
    return [m[i][n] / m[i][i] if abs(m[i][i]) >= 1e-300 else 0.0 for i in range(n)]


def _apply(hw: HardwareProfile, x: list[float], split: bool) -> HardwareProfile:
    inv_ce, inv_be, step, seq, req, ctx, attn = x
    # attention's price relative to the matmuls' (before the peak below may move both)
    factor = attn / inv_ce if split else hw.attention_cost_factor
    peak, fp8, bw = hw.peak_flops, hw.fp8_peak_flops, hw.mem_bandwidth
    if inv_ce < 1.0:  # faster than the table's peak: the peak was wrong for this machine
        peak, fp8 = peak / inv_ce, (fp8 / inv_ce if fp8 is not None else None)
        inv_ce = 1.0
    if inv_be < 1.0:
        bw, inv_be = bw / inv_be, 1.0
    return dataclasses.replace(
        hw,
        peak_flops=peak,
        fp8_peak_flops=fp8,
        mem_bandwidth=bw,
        compute_efficiency=1.0 / inv_ce,
        bandwidth_efficiency=1.0 / inv_be,
        step_overhead_s=max(step, 0.0),
        seq_overhead_s=max(seq, 0.0),
        request_overhead_s=max(req, 0.0),
        context_token_s=max(ctx, 0.0),
        attention_cost_factor=factor,
    )


# -- profile files ---------------------------------------------------------------------------


class _HardwareFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    kind: Literal["gpu", "low-latency", "giant-context", "provider-api", "cpu"]
    base: str | None = None
    peak_flops: float = Field(gt=0)
    fp8_peak_flops: float | None = Field(None, gt=0)
    mem_bandwidth: float = Field(gt=0)
    mem_capacity: float = Field(gt=0)
    power_watts: float = Field(gt=0)
    interconnect_bandwidth: float = Field(gt=0)
    compute_efficiency: float = Field(gt=0, le=1)
    bandwidth_efficiency: float = Field(gt=0, le=1)
    step_overhead_s: float = Field(ge=0)
    seq_overhead_s: float = Field(0.0, ge=0)
    context_token_s: float = Field(0.0, ge=0)
    request_overhead_s: float = Field(0.0, ge=0)
    frontend_request_s: float = Field(0.0, ge=0)
    frontend_token_s: float = Field(0.0, ge=0)
    frontend_handoff_s: float = Field(0.0, ge=0)
    attention_cost_factor: float = Field(1.0, gt=0)
    speed_spread: tuple[Annotated[float, Field(gt=0, allow_inf_nan=False)], ...] = ()
    speed_spread_window_s: float = Field(0.0, ge=0, allow_inf_nan=False)
    idle_wake_s: float = Field(0.0, ge=0, allow_inf_nan=False)
    after_stream_s: float = Field(0.0, ge=0, allow_inf_nan=False)
    after_stream_factor: float = Field(0.0, ge=0, allow_inf_nan=False)
    allreduce_latency_s: float = Field(0.0, ge=0)
    layer_latency_s: float = Field(0.0, ge=0)
    network_rtt_s: float = Field(0.0, ge=0)
    rate_limit_rpm: int | None = Field(None, gt=0)
    source: str = "calibrated"


class _ProfileFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["inferplane/hardware-profile"]
    version: Literal[1]
    hardware: _HardwareFields
    calibration: dict[str, Any] = Field(default_factory=dict)


def load_hardware_profile(path: str | Path) -> HardwareProfile:
    """Read a profile file; raise ``ValueError`` naming the file and the field on any problem."""
    return load_profile_file(path)[0]


def load_profile_file(path: str | Path) -> tuple[HardwareProfile, str | None]:
    """`load_hardware_profile`, and the model profile the engine was probed with
    (``calibration.model_profile``; None when the file does not say). A calibrated profile
    holds for that model: its factors are fitted to that model's prefills and decodes, and
    what they say about another model's — an extrapolation in FLOPs, bytes and attention pairs
    across model sizes — was never measured (`Fleet.from_config` warns)."""
    p = Path(path)
    try:
        data = read_yaml(p)  # a repeated key is refused, as in the fleet file
    except ConfigError as exc:  # "FILE: line L, column C: invalid YAML: …", "FILE: cannot read: …"
        raise ValueError(str(exc)) from None
    try:
        f = _ProfileFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "(top level)"
        raise ValueError(f"{p}: {loc}: {first['msg']}") from None
    h = f.hardware
    if h.name in HARDWARE:
        raise ValueError(
            f"{p}: hardware.name: {h.name!r} is a built-in profile; give the calibrated one "
            "its own name"
        )
    fields = h.model_dump(exclude={"base"})
    probed = f.calibration.get("model_profile")
    try:
        hw = HardwareProfile(**fields)
    except ValueError as exc:  # what the fields cannot say one by one (speed_spread's window)
        raise ValueError(f"{p}: hardware: {exc}") from None
    return hw, (str(probed) if probed is not None else None)


def dump_profile(cal: Calibration, base: str, meta: dict[str, Any]) -> str:
    """The YAML text of a profile file for ``cal`` fitted from the table's ``base`` profile, with
    ``meta`` (endpoint, model, date…) and every probe point under ``calibration``. A zero
    ``frontend_handoff_s`` (a one-piece front end), an ``attention_cost_factor`` of 1, an
    empty ``speed_spread``, a zero ``idle_wake_s`` and a zero ``after_stream_s`` and
    ``after_stream_factor`` are left out, so that a reader older than the field (it forbids
    unknown fields) still loads the file."""
    hw = dataclasses.asdict(cal.hardware)
    for key in ("idle_wake_s", "after_stream_s", "after_stream_factor"):
        if not hw[key]:
            del hw[key]
    if not hw["frontend_handoff_s"]:
        del hw["frontend_handoff_s"]
    if hw["attention_cost_factor"] == 1.0:
        del hw["attention_cost_factor"]
    if hw["speed_spread"]:
        hw["speed_spread"] = list(hw["speed_spread"])
    else:
        del hw["speed_spread"], hw["speed_spread_window_s"]
    hardware = {"name": hw.pop("name"), "kind": hw.pop("kind"), "base": base, **hw}
    doc = {
        "kind": PROFILE_KIND,
        "version": PROFILE_VERSION,
        "hardware": hardware,
        "calibration": {
            **meta,
            "fit": {
                "median_abs_error": round(cal.median_error, 4),
                "max_abs_error": round(cal.max_error, 4),
            },
            "prefill": [
                {
                    "prompt_tokens": p.prompt_tokens,
                    "cached_tokens": p.cached_tokens,
                    "ttft_s": round(p.ttft_s, 6),
                    "fitted_s": round(f, 6),
                }
                for p, f in cal.prefill
            ],
            "decode": [
                {
                    "batch": d.batch,
                    "context_tokens": d.context_tokens,
                    "itl_s": round(d.itl_s, 6),
                    "fitted_s": round(f, 6),
                }
                for d, f in cal.decode
            ],
            "bursts": [
                {
                    "size": b.size,
                    "prompt_tokens": b.prompt_tokens,
                    "ttft_s": [round(t, 6) for t in b.ttft_s],
                    "fitted_s": [round(t, 6) for t in f],
                }
                for b, f in cal.bursts
            ],
            "loaded": [
                {
                    "batch": p.batch,
                    "context_tokens": p.context_tokens,
                    "prompt_tokens": p.prompt_tokens,
                    "ttft_s": round(p.ttft_s, 6),
                    "fitted_s": round(f, 6),
                }
                for p, f in cal.loaded
            ],
            **({"after_stream": [
                {
                    "prompt_tokens": p.prompt_tokens,
                    "ttft_s": round(p.ttft_s, 6),
                    "fitted_s": round(f, 6),
                }
                for p, f in cal.after_stream
            ]} if cal.after_stream else {}),
        },
    }
    header = (
        "# A calibrated hardware profile, written by `inferplane calibrate`. Its factors are\n"
        "# fitted to the engine serving calibration.model_profile: they hold for that model\n"
        "# (a fleet that uses the profile for another model's endpoint gets a warning).\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False)
