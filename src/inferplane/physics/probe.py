"""Measure a live engine for calibration (``inferplane calibrate``): the one module of
``physics`` that does I/O.

Sweeps over the OpenAI completions API, each point the median of ``repeats`` tries, except the
prefill and cached points (see there):

* **prefill**: a lone streamed request of ``max_tokens=1`` per prompt length; TTFT is the time
  from sending the request to the first chunk that carries a token. Every prompt starts with a
  fresh random word, so nothing of it is in the prefix cache. The prompt's token count is the
  engine's own (``usage.prompt_tokens``), so no tokenizer is needed here. The sweep is taken
  :data:`PREFILL_VISITS` times a round (``prefill_visits``), evenly spaced through the round
  from its start (:func:`prefill_positions`), and each point is the median of all its
  ``repeats × prefill_visits`` tries (:func:`typical_s`). On a host that runs long prefills in
  two speed states for seconds at a time, the median of one try a round (until session 23)
  landed on whichever state held at 3 of the 5 rounds' starts (session 22's fidelity vLLM: its
  768-token point ~36 ms in some runs, 51-54 in others), while the workload the profile is held
  to, sent over the same minutes, mixes both (docs/physics.md); tries spread through the rounds
  sample that mix. Each cold try follows the previous length's one-token cached try (or the
  round's opener); ``Prober.run(sweep_stream_tokens=N)``, N > 1, is an opt-in that puts every
  cold try right after a stream ended instead, as the fidelity workload's closed-loop requests
  are: each sweep then opens with an untimed short stream (:meth:`Prober.lead_in`) and its
  cached tries stream N tokens. Session 25 measured the fidelity vLLM's fresh prefill a few per
  cent slower right after a stream (``calibration-s25/after_stream.txt``) and found no fidelity
  gain from the opt-in beyond run-to-run noise (docs/benchmarks.md), so it is off by default.
* **after a stream**: after a sweep's cold and cached tries of every length, for each length
  an untimed fresh short prompt (:data:`LEAD_IN_PROMPT_TOKENS`) streams ``after_stream_tokens``
  tokens (:data:`AFTER_STREAM_TOKENS`, the fidelity workload's output length) and a fresh prompt
  of the length is sent cold right after its last token: each length's point is the median of
  its tries, and the differences from the cold points are the engine's after-stream cost
  (``calibration.fit_after_stream``; ``HardwareProfile.after_stream_s``). Session 27 measured
  the fidelity vLLM's c1 workload requests on its Intel host +20-25 % over the lone prediction
  at every length (each right after a stream), which the cold tries never saw; session 28's
  probe on that host measured +1 … +20 % over the cold points (16-768 tokens). The tries come
  after the whole sweep, not after each length's cached try, where every later cold try of the
  sweep came two requests after a stream: the held-out lone requests were over-predicted by
  ~+10 % in session 28's runs of that order (+2 % in one), which such cold tries paying part of
  the stream's cost would explain; two runs after the move, +3 and +10 %, did not show it
  smaller (docs/benchmarks.md). An untimed one-token request
  (:meth:`Prober.settle`) ends the block, so that what follows it (a decode point, a burst)
  does not come right after an after-stream try.
* **cached**: the same prompt sent twice; the second TTFT (its first token; it streams
  ``sweep_stream_tokens`` tokens, 1 by default) with ``cached_tokens`` as the engine
  reports them (``usage.prompt_tokens_details``; points without the field are left out).
* **decode**: ``B`` streams started together, each a short prompt and ``decode_tokens`` output
  tokens (``ignore_eos``); ITL is a stream's time from its first to its last token over the
  tokens after the first (the workload's time per output token), the median over the ``B``
  streams. Not single gaps between chunks (a front end may coalesce them), and not the time to
  the last token less a lone request's TTFT (that counts the wait for the other streams'
  intakes as decode time), except when every stream came in one burst. Every point of every
  round, against its point's median and its round's, is the engine's **speed spread**
  (``calibration.speed_spread``): how much slower or faster one stretch of time ran than the
  others of its round, which the emulator plays back (``physics.spread``).

* **bursts**: ``N`` fresh one-token requests sent at once; their TTFTs, sorted, each rank the
  median over the rounds. An engine whose front end takes requests in one at a time answers
  them one intake apart; one that takes them in parallel answers them together.
* **idle wake**: at each round's end, :data:`IDLE_TRIES` times, a fresh one-token request sent
  right after the previous request ended and another after :data:`IDLE_GAP_S` of nothing: the
  median of the differences (0 under :data:`IDLE_WAKE_FLOOR_S`) is the engine's
  ``idle_wake_s``, what a request pays for reaching an engine that sat idle (its processes
  wake from their idle wait). Every other
  probe request follows another at once, so the fit never sees that cost.
* **loaded**: while ``max(batches) // 2`` streams decode (``loaded_decode_tokens`` each; half,
  so that the engine has a free sequence slot for the probe request), up to three
  one-token requests one after the other; the TTFTs of those answered before any stream ended,
  median over all rounds. A front end busy sending the streams' chunks makes them wait.

The engine's own TTFT includes its HTTP and tokenisation time, which is what the gateway
observes too: the fit puts it in ``request_overhead_s``, and the share of it that the bursts
show to be serialised in ``frontend_request_s`` and ``frontend_handoff_s``
(``calibration.fit_frontend``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import orjson

from inferplane.physics.calibration import (
    BurstPoint,
    DecodePoint,
    LoadedPoint,
    PrefillPoint,
    achieved_peak,
    dump_profile,
    fit,
    fit_after_stream,
    fit_frontend,
    speed_spread,
)
from inferplane.physics.hardware import get_hardware
from inferplane.physics.models import get_model
from inferplane.tokenization import VOCABULARY

#: Below this many seconds per token between a stream's first and last token, the tokens came
#: in one burst (no engine decodes a token in 20 us; a starved HTTP front end sends them at once).
BURST_S_PER_TOKEN = 20e-6
#: Consecutive smooth streams that end the warm-up, and the most it may take.
WARM_UP_STREAMS = 5
WARM_UP_MAX_S = 90.0

#: Prompt tokens of the untimed requests that open connections (`Prober.open_connections`).
OPENER_TOKENS = 8

#: Times each probe round takes the prefill sweep (every prompt length, cold and then cached)
#: by default (``inferplane calibrate --prefill-visits``), evenly spaced through the round from
#: its start (`prefill_positions`). One visit a round (until session 23) sampled the host at
#: the rounds' starts only: 5 tries of each length, a few seconds of a probe whose host changes
#: speed from one stretch of seconds to the next.
PREFILL_VISITS: Final = 3

#: Output tokens of each prefill sweep's warm (cached) requests and of its untimed lead-in
#: stream (``Prober.run``'s ``sweep_stream_tokens``; 1, the default: neither streams, no lead-in,
#: every cold try follows a one-token request, as before session 25). N > 1 is an opt-in that
#: sends every cold prefill try right after a stream ended, as the fidelity workload's closed-loop
#: requests are. Session 25 (AMD EPYC host, ``calibration-s25/``): a fresh prefill right after an
#: 8-token stream is +2.5 % (95 % CI +0.7 … +4.5) over right after a one-token request, the old
#: order +1.3 % (−0.8 … +3.3) (``after_stream_stats.txt``); with 8, three fidelity runs against
#: three of the default showed no gain beyond noise, +1.6-1.9 s (~+20 %) of probe time, the
#: held-out lone requests over-predicted by +6.6 % on average and a worse cached 768-token fit.
SWEEP_STREAM_TOKENS: Final = 1
#: Prompt tokens of the lead-in stream before each prefill sweep.
LEAD_IN_PROMPT_TOKENS: Final = 32
#: Output tokens of the untimed stream before each after-stream cold try (``Prober.run``'s
#: ``after_stream_tokens``; 0: no after-stream tries, no ``after_stream_*`` in the profile):
#: the fidelity workload's. Session 27 (Intel host): a 16-token cold try after the decode
#: points' 64-token streams +20 % over one after a one-token request, after 8-token streams
#: (``sweep_stream_tokens=8``) about half of the workload's gap.
AFTER_STREAM_TOKENS: Final = 32

#: Seconds of nothing sent before each idle-wake try (`Prober.idle_wake_once`): long enough that
#: the fidelity vLLM pays its whole wake-up cost (+3.2 ms after 0.1 and after 0.2 s, +2.4 after
#: 0.05: ``calibration-s24/idle_gap.txt``, session 24), short enough to cost the probe little (2
#: tries × 5 rounds: 2 s), and far below the API server's 5-s keep-alive, so the try's
#: connection is still open.
IDLE_GAP_S: Final = 0.2
#: Idle-wake tries a round by default: each a back-to-back request and one after the gap.
IDLE_TRIES: Final = 2
#: Prompt tokens of the idle-wake requests: short (the cost does not grow with the prompt:
#: +2.8 / +3.4 / +3.3 ms at 32 / 384 / 768 tokens in ``ttft_shape``, session 24).
IDLE_PROMPT_TOKENS: Final = 64
#: A fitted wake-up cost under this is written as 0 (no ``idle_wake_s`` in the file): an engine
#: without one reads a little either way (the fidelity vLLM after 1-3 ms of idle, no wake yet:
#: -0.12 / -0.11 ms, medians of 14 in ``calibration-s24/idle_gap.txt``), and a median of ten
#: tries that spread ~1.4 ms (wake1: +2.5 ... +3.9 ms) moves by a few tenths of a millisecond;
#: the cost measured on the fidelity vLLM, 2.8-3.2 ms, is six times this.
IDLE_WAKE_FLOOR_S: Final = 0.0005

#: Words a prompt is made of: common English words, one token each in a real model's tokenizer
#: (and in the fidelity tier's word-level one, and the emulator's). Words outside the engine's
#: vocabulary would all become the same unknown token, so that every "fresh" prompt of a length
#: were the same token ids and hit the prefix cache (the fidelity vLLM did, until session 7:
#: "n3f… alpha bravo …" was all ``<unk>``, and every probe and workload prompt was cached).
_WORDS: Final = VOCABULARY
#: Random words that open every prompt: 256**6 openings, so no two prompts share a first block.
NONCE_WORDS: Final = 6


class ProbeError(RuntimeError):
    """The engine did not answer as an OpenAI-compatible completions server should."""


def typical_s(tries: Sequence[float]) -> float:
    """A prefill point's value from its tries: their median, as every other probe point's.
    Session 23 took the mean less a fifth cut from each end; refitted offline on fidelity runs'
    kept tries (``bench/calibration_statistic.py``; docs/benchmarks.md, session 24), neither
    predicted the real engine's TTFTs closer beyond the runs' noise (the trimmed mean was ahead
    on session 23's three runs, the only ones whose tries showed two speed states; on this
    session's calm runs the two differ by under 1 %), so the simpler one. The median is also
    what the emulator's speed
    spread is measured against (``calibration.speed_spread``: each decode try over its point's
    median), so that the emulator, which plays the spread back on top of the profile's times,
    does not count a slow share twice."""
    if not tries:
        raise ValueError("no tries")
    return statistics.median(tries)


def idle_wake_s(tries: Sequence[tuple[float, float]]) -> float:
    """The engine's wake-up cost from the idle-wake tries, each (back-to-back TTFT, after-idle
    TTFT): the median of the differences, 0 under `IDLE_WAKE_FLOOR_S` (0 without tries). The
    median, as every other point's: a try that met a slow stretch of the host on one side only
    moves it little."""
    if not tries:
        return 0.0
    wake = statistics.median(idle - busy for busy, idle in tries)
    return wake if wake >= IDLE_WAKE_FLOOR_S else 0.0


def prefill_positions(tasks: int, visits: int) -> list[int]:
    """Where a round's ``visits`` prefill sweeps go among its ``tasks`` other measurements
    (decode points, bursts, the loaded point): before the task of each returned index, one
    every ``tasks / visits`` tasks from the round's start, so that consecutive visits are as
    evenly spaced in the probe's sequence as whole tasks allow, across the rounds' ends too.
    Not the last after the round's last task (until session 24): that one and the next
    round's first came back to back, one visit in effect, sampling the same stretch of the
    host's speed twice. Never after the last task either when there are more than twice as many
    visits as tasks (``round`` alone gave 3 for the last of 7 visits among 3 tasks): clamped to
    the last task, which leaves the default probe's positions as they were ([0, 2, 5] of 7)."""
    last = max(tasks - 1, 0)
    return [min(round(k * tasks / visits), last) for k in range(max(visits, 0))]


@dataclass
class ProbeResult:
    prefill: list[PrefillPoint] = field(default_factory=list)
    cached: list[PrefillPoint] = field(default_factory=list)
    decode: list[DecodePoint] = field(default_factory=list)
    bursts: list[BurstPoint] = field(default_factory=list)
    loaded: list[LoadedPoint] = field(default_factory=list)
    #: every decode point of every round against its point and its round
    #: (``calibration.speed_spread``), and the span each was measured over: one stream's decode
    speed_spread: tuple[float, ...] = ()
    speed_spread_window_s: float = 0.0
    #: every cold prefill try's TTFT per requested prompt length, in the order sent
    prefill_tries_s: dict[int, list[float]] = field(default_factory=dict)
    #: each length's cold prefill right after a stream (median of its tries), and every try
    after_stream: list[PrefillPoint] = field(default_factory=list)
    after_stream_tries_s: dict[int, list[float]] = field(default_factory=dict)
    #: every idle-wake try's (back-to-back TTFT, after-idle TTFT), in the order sent
    idle_tries_s: list[tuple[float, float]] = field(default_factory=list)
    #: the probe's own time: warm-up to the last round, less the caller's ``between_rounds``
    probe_s: float = 0.0


@dataclass(frozen=True, slots=True)
class _Stream:
    ttft_s: float
    decode_s: float  # from the first token's chunk to the last one's
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None

    @property
    def burst(self) -> bool:
        """All tokens after the first arrived at once: the engine's front end held the stream
        back (a starved CPU), so its timing says nothing about the engine."""
        return self.completion_tokens > 2 and self.decode_s < BURST_S_PER_TOKEN * (
            self.completion_tokens - 1
        )

    def tpot_s(self, lone_ttft_s: float) -> float | None:
        """Time per output token after the first: (time to the last token − ``lone_ttft_s``,
        the TTFT of a lone one-token request of the same size) over the tokens after the first.
        Not the gaps between chunks: a loaded engine front end can hold a whole stream back and
        send it at once, which only the time to the last token survives."""
        n = self.completion_tokens - 1
        span = self.ttft_s + self.decode_s - lone_ttft_s
        return span / n if n > 0 and span > 0 else None


def prompt_of(words: int, nonce: str) -> str:
    """A prompt of ``words`` words (``nonce``'s first, then a fixed cycle of common words) that
    no other prompt shares a first block with, given a fresh :func:`_nonce`."""
    head = nonce.split()[:words]
    body = " ".join(_WORDS[(i * 7) % len(_WORDS)] for i in range(max(0, words - len(head))))
    return " ".join([*head, body] if body else head)


class Prober:
    """One engine, one model; see the module docstring."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._words_per_token = 1.0

    async def stream(
        self,
        session: aiohttp.ClientSession,
        prompt: str,
        max_tokens: int,
        on_first: asyncio.Event | None = None,
    ) -> _Stream:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if max_tokens > 1:
            body["ignore_eos"] = True
            body["min_tokens"] = max_tokens
        started = time.perf_counter()
        first: float | None = None
        last = 0.0
        usage: dict[str, Any] | None = None
        async with session.post(
            f"{self.url}/v1/completions", data=orjson.dumps(body), headers=self.headers
        ) as resp:
            if resp.status != 200:
                text = (await resp.read())[:300].decode("utf-8", "replace")
                raise ProbeError(f"{self.url}/v1/completions answered {resp.status}: {text}")
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                now = time.perf_counter()
                try:
                    chunk = orjson.loads(line[5:])
                except orjson.JSONDecodeError:
                    raise ProbeError(f"not JSON in the stream: {line[:120]!r}") from None
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                choices = chunk.get("choices") or []
                # a token whose text is empty (a special token the engine does not print) still
                # ends a one-token request: its chunk carries the finish reason
                if choices and (choices[0].get("text") or choices[0].get("finish_reason")):
                    if first is None:
                        first = now
                        if on_first is not None:
                            on_first.set()
                    last = now
        if first is None or usage is None:
            raise ProbeError(
                "the stream carried no token or no usage (the engine must honour "
                "stream_options.include_usage)"
            )
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        return _Stream(
            ttft_s=first - started,
            decode_s=last - first,
            prompt_tokens=int(usage["prompt_tokens"]),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            cached_tokens=int(cached) if isinstance(cached, int) else None,
        )

    def words_for(self, tokens: int) -> int:
        return max(1, round(tokens / self._words_per_token))

    async def warm_up(
        self, session: aiohttp.ClientSession, max_s: float = WARM_UP_MAX_S
    ) -> bool:
        """Stream short requests until `WARM_UP_STREAMS` in a row arrive token by token (a fresh
        engine compiles and allocates; a starved one sends streams in bursts), at most
        ``max_s``. True when the engine streams smoothly."""
        deadline = time.monotonic() + max_s
        smooth = 0
        while smooth < WARM_UP_STREAMS:
            if time.monotonic() > deadline:
                return False
            s = await self.stream(session, prompt_of(24, _nonce()), 24)
            smooth = 0 if s.burst else smooth + 1
        return True

    async def learn_words_per_token(self, session: aiohttp.ClientSession) -> None:
        s = await self.stream(session, prompt_of(200, _nonce()), 1)
        self._words_per_token = s.prompt_tokens / 200

    async def open_connections(self, session: aiohttp.ClientSession, n: int = 1) -> None:
        """``n`` short one-token requests at once, untimed: ``session`` then holds ``n`` open
        connections, so that the timed requests after them do not pay for opening one. A
        request on a new connection took ~0.7 ms longer on the fidelity vLLM (4.9 against 4.2
        ms at 96 tokens, medians of 24: docs/benchmarks.md, session 21), and the API server
        closes a connection idle for 5 s (uvicorn's keep-alive): the first request of a probe
        round or of a fresh session would pay it where a gateway's pooled connections under
        steady traffic do not."""
        words = self.words_for(OPENER_TOKENS)
        await asyncio.gather(*(self.stream(session, prompt_of(words, _nonce()), 1)
                               for _ in range(n)))

    async def prefill_once(
        self, session: aiohttp.ClientSession, tokens: int, warm_tokens: int = 1
    ) -> tuple[_Stream, _Stream]:
        """A fresh prompt of about ``tokens`` tokens, sent cold (one output token) and then
        again (warm), the warm request streaming ``warm_tokens`` output tokens: its TTFT is the
        cached point's, its stream what the next cold try follows (see `Prober.run`)."""
        prompt = prompt_of(self.words_for(tokens), _nonce())
        cold = await self.stream(session, prompt, 1)
        return cold, await self.stream(session, prompt, warm_tokens)

    async def settle(self, session: aiohttp.ClientSession) -> None:
        """An untimed fresh one-token request of :data:`OPENER_TOKENS` tokens after a sweep's
        after-stream tries. On session 28's Intel host a cold try right after an after-stream
        try still paid part of the stream's cost (the 64-token point 1.19x the held-out
        96-token lone request of the same run, 0.92-1.04x in session 27's three runs of main);
        the tries come after the whole sweep so that no cold try comes two requests after one
        either (`Prober.run`, the module docstring)."""
        await self.stream(session, prompt_of(self.words_for(OPENER_TOKENS), _nonce()), 1)

    async def lead_in(self, session: aiohttp.ClientSession, stream_tokens: int) -> None:
        """An untimed fresh short prompt (:data:`LEAD_IN_PROMPT_TOKENS`) streamed with
        ``stream_tokens`` output tokens: what the first cold try of a prefill sweep follows, as
        every later one follows the previous length's warm stream."""
        await self.stream(session, prompt_of(self.words_for(LEAD_IN_PROMPT_TOKENS), _nonce()),
                          stream_tokens)

    async def decode_once(
        self, session: aiohttp.ClientSession, batch: int, decode_tokens: int, prompt_tokens: int
    ) -> tuple[float, int]:
        """One batch of ``batch`` streams: (median ITL over its streams, prompt tokens).

        A stream's ITL is its own time from first to last token over the tokens after the
        first — what the fidelity workload's time per output token measures. Not the time to
        its last token less a lone request's TTFT: the streams start together, so all but the
        first wait for the others' intakes before their first token, and that wait (tens of
        ms in a burst of 4 on the fidelity vLLM at load 11, session 4) would be spread over the
        decode as if every step were slower. Only when every stream came in one burst (a
        starved front end held it back, so its own span says nothing) does the lone request's
        TTFT stand in."""
        words = self.words_for(prompt_tokens)
        lone = await self.stream(session, prompt_of(words, _nonce()), 1)
        streams = await asyncio.gather(
            *(self.stream(session, prompt_of(words, _nonce()), decode_tokens)
              for _ in range(batch))
        )
        tpots = [s.decode_s / (s.completion_tokens - 1) for s in streams
                 if s.completion_tokens > 1 and s.decode_s > 0 and not s.burst]
        if not tpots:
            tpots = [t for t in (s.tpot_s(lone.ttft_s) for s in streams) if t is not None]
        if not tpots:
            raise ProbeError(f"no stream of batch {batch} produced more than one token")
        return statistics.median(tpots), int(statistics.median(s.prompt_tokens for s in streams))

    async def idle_wake_once(
        self, session: aiohttp.ClientSession, tokens: int, gap_s: float = IDLE_GAP_S
    ) -> tuple[float, float]:
        """A fresh one-token request of about ``tokens`` tokens sent right after the previous
        request, then another after ``gap_s`` of nothing: their TTFTs."""
        words = self.words_for(tokens)
        busy = await self.stream(session, prompt_of(words, _nonce()), 1)
        await asyncio.sleep(gap_s)
        idle = await self.stream(session, prompt_of(words, _nonce()), 1)
        return busy.ttft_s, idle.ttft_s

    async def burst_once(
        self, session: aiohttp.ClientSession, size: int, tokens: int
    ) -> list[float]:
        """``size`` fresh one-token requests of about ``tokens`` tokens sent together: their
        TTFTs, sorted."""
        words = self.words_for(tokens)
        streams = await asyncio.gather(
            *(self.stream(session, prompt_of(words, _nonce()), 1) for _ in range(size))
        )
        return sorted(s.ttft_s for s in streams)

    async def loaded_once(
        self,
        session: aiohttp.ClientSession,
        batch: int,
        decode_tokens: int,
        prompt_tokens: int,
        probe_tokens: int,
        probes: int = 3,
    ) -> tuple[list[float], int]:
        """``batch`` streams of ``decode_tokens`` tokens; once all of them decode, ``probes``
        one-token requests of about ``probe_tokens`` tokens one after the other. Returns the
        TTFTs of the probes that got their first token while every stream was still decoding,
        and the streams' prompt tokens."""
        words = self.words_for(prompt_tokens)
        started = [asyncio.Event() for _ in range(batch)]

        async def decoding(ev: asyncio.Event) -> tuple[float, _Stream]:
            t0 = time.perf_counter()
            st = await self.stream(session, prompt_of(words, _nonce()), decode_tokens, ev)
            return t0 + st.ttft_s + st.decode_s, st  # when its last token came

        tasks = [asyncio.ensure_future(decoding(ev)) for ev in started]
        firsts: list[tuple[float, float]] = []  # (ttft, when the first token came)
        try:
            await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)),
                                   self.timeout.total)
            for _ in range(probes):
                if any(t.done() for t in tasks):
                    break
                t0 = time.perf_counter()
                s = await self.stream(session, prompt_of(self.words_for(probe_tokens),
                                                         _nonce()), 1)
                firsts.append((s.ttft_s, t0 + s.ttft_s))
        finally:
            done = await asyncio.gather(*tasks)
        ended = min(end for end, _ in done)
        # a probe answered after a stream had ended saw a smaller batch: leave it out
        return ([ttft for ttft, at in firsts if at < ended],
                int(statistics.median(st.prompt_tokens for _, st in done)))

    async def run(
        self,
        prompt_tokens: Sequence[int],
        batches: Sequence[int],
        *,
        bursts: Sequence[int] = (),
        burst_prompt_tokens: int = 64,
        loaded_decode_tokens: int = 128,
        decode_tokens: int = 64,
        decode_prompt_tokens: int = 32,
        long_decode_prompt_tokens: int = 384,
        repeats: int = 5,
        warm_up_max_s: float = WARM_UP_MAX_S,
        require_smooth: bool = True,
        between_rounds: Callable[[int], Awaitable[None]] | None = None,
        prefill_visits: int = PREFILL_VISITS,
        idle_tries: int = IDLE_TRIES,
        idle_gap_s: float = IDLE_GAP_S,
        sweep_stream_tokens: int = SWEEP_STREAM_TOKENS,
        after_stream_tokens: int = AFTER_STREAM_TOKENS,
    ) -> ProbeResult:
        """Every point ``repeats`` times, the sweeps interleaved (each round visits every point
        once), so that a burst of load elsewhere on the machine spreads over the points instead
        of bending one of them; each point is the median of its rounds. The prefill sweep
        (cold and cached) is taken ``prefill_visits`` times a round, evenly spaced through it
        (:func:`prefill_positions`), and each of its points is the :func:`typical_s` (median)
        of its ``repeats × prefill_visits`` tries. ``sweep_stream_tokens`` > 1 (opt-in; the
        default 1 is :data:`SWEEP_STREAM_TOKENS`): each sweep opens with a lead-in stream and its
        cached tries stream that many tokens, so that every cold try follows a stream; the
        decode and burst points placed after a sweep then follow its last cached stream too.
        ``after_stream_tokens`` (0: none): after each sweep's cold and cached tries, for each
        length a cold try right after an untimed stream of that many tokens, then one untimed
        one-token request (the module docstring). With more visits than a round's tasks leave
        room for (``prefill_positions`` clamps two to the same place) a sweep's cold tries follow
        the previous sweep's block; the default probe's never do. Each round ends with
        ``idle_tries`` idle-wake tries (:meth:`idle_wake_once`, ``idle_gap_s`` of idle; 0:
        none), which :func:`idle_wake_s` turns into the engine's wake-up cost.
        ``between_rounds(i)`` is awaited after round ``i`` (0-based): a caller's own
        measurements of the same engine (a comparison with what the profile predicts) spread
        over the same minutes as the probe, so that the engine running faster or slower for a
        while (a shared host) moves both alike instead of only one.

        Decode batches run with ``decode_prompt_tokens``-token prompts and, for the smallest and
        the largest batch, again with ``long_decode_prompt_tokens`` (0: not), so that the fit
        sees the step grow with the context it attends to (``context_token_s``); the workload's
        prompts are up to 24 times the short one."""
        if sweep_stream_tokens < 1:
            raise ValueError(f"sweep_stream_tokens must be 1 or more ({sweep_stream_tokens})")
        if after_stream_tokens < 0 or after_stream_tokens == 1:
            raise ValueError(f"after_stream_tokens must be 0 (none) or 2 or more "
                             f"({after_stream_tokens})")
        cold: dict[int, list[_Stream]] = {n: [] for n in prompt_tokens}
        after: dict[int, list[_Stream]] = {n: [] for n in prompt_tokens}
        warm: dict[int, list[_Stream]] = {n: [] for n in prompt_tokens}
        decode_points = [(b, decode_prompt_tokens) for b in batches]
        if long_decode_prompt_tokens and batches:
            decode_points += [(b, long_decode_prompt_tokens)
                              for b in sorted({min(batches), max(batches)})]
        itl: dict[tuple[int, int], list[float]] = {p: [] for p in decode_points}
        burst: dict[int, list[list[float]]] = {n: [] for n in bursts}
        loaded: list[float] = []
        # half the largest decode batch: the probe request must find a free sequence slot
        loaded_batch = max(batches, default=0) // 2 if bursts else 0
        loaded_ctx = 0
        context: dict[tuple[int, int], int] = {}
        if prefill_visits < 1:
            raise ValueError(f"prefill_visits must be 1 or more ({prefill_visits})")

        async def prefill_sweep(session: aiohttp.ClientSession) -> None:
            if sweep_stream_tokens > 1:
                await self.lead_in(session, sweep_stream_tokens)
            for n in prompt_tokens:
                c, w = await self.prefill_once(session, n, sweep_stream_tokens)
                cold[n].append(c)
                warm[n].append(w)
            # the after-stream tries after the whole sweep, not between its lengths, so that no
            # cold try follows their streams closely (the module docstring)
            for n in prompt_tokens if after_stream_tokens else ():
                await self.lead_in(session, after_stream_tokens)
                after[n].append(await self.stream(
                    session, prompt_of(self.words_for(n), _nonce()), 1))
            if after_stream_tokens:
                await self.settle(session)

        async def decode_point(session: aiohttp.ClientSession, b: int, n: int) -> None:
            t, ctx = await self.decode_once(session, b, decode_tokens, n)
            itl[b, n].append(t)
            context[b, n] = ctx

        async def burst_point(session: aiohttp.ClientSession, n: int) -> None:
            burst[n].append(await self.burst_once(session, n, burst_prompt_tokens))

        async def loaded_point(session: aiohttp.ClientSession) -> None:
            nonlocal loaded_ctx
            got, loaded_ctx = await self.loaded_once(
                session, loaded_batch, loaded_decode_tokens, decode_prompt_tokens,
                burst_prompt_tokens,
            )
            loaded.extend(got)

        # a round's measurements other than the prefill sweep, in their order; the sweep's
        # visits go between them, evenly spaced (the first before them all)
        tasks: list[Callable[[aiohttp.ClientSession], Awaitable[None]]] = [
            *(functools.partial(decode_point, b=b, n=n) for b, n in decode_points),
            *(functools.partial(burst_point, n=n) for n in bursts),
            *([loaded_point] if loaded_batch else []),
        ]
        visits_before = Counter(prefill_positions(len(tasks), prefill_visits))
        idle_tries_s: list[tuple[float, float]] = []
        between_s = 0.0
        started = time.perf_counter()
        async with aiohttp.ClientSession(timeout=self.timeout) as session:
            await self.learn_words_per_token(session)
            if not await self.warm_up(session, warm_up_max_s) and require_smooth:
                raise ProbeError(
                    f"{self.url} kept sending its streams in bursts for {warm_up_max_s:.0f} s "
                    "(all tokens at once): its front end is starved of CPU, so its timing "
                    "cannot be measured; calibrate on a quieter machine"
                )
            for round_ in range(repeats):
                # the round's first timed request on an open connection (a caller's
                # ``between_rounds`` may outlast the engine's keep-alive)
                await self.open_connections(session)
                for i in range(len(tasks) + 1):
                    for _ in range(visits_before[i]):
                        await prefill_sweep(session)
                    if i < len(tasks):
                        await tasks[i](session)
                for _ in range(idle_tries):
                    idle_tries_s.append(await self.idle_wake_once(
                        session, IDLE_PROMPT_TOKENS, idle_gap_s))
                if between_rounds is not None:
                    t = time.perf_counter()
                    await between_rounds(round_)
                    between_s += time.perf_counter() - t
        out = ProbeResult(probe_s=time.perf_counter() - started - between_s,
                          idle_tries_s=idle_tries_s)
        for n in prompt_tokens:
            tokens = int(statistics.median(s.prompt_tokens for s in cold[n]))
            out.prefill.append(PrefillPoint(tokens, 0, typical_s([s.ttft_s for s in cold[n]])))
            out.prefill_tries_s[n] = [s.ttft_s for s in cold[n]]
            if after[n]:
                out.after_stream.append(PrefillPoint(
                    tokens, 0, typical_s([s.ttft_s for s in after[n]])))
                out.after_stream_tries_s[n] = [s.ttft_s for s in after[n]]
            hits = [s for s in warm[n] if s.cached_tokens]
            if len(hits) * 2 > len(warm[n]):  # the engine reports cached tokens and had them
                out.cached.append(PrefillPoint(
                    tokens,
                    int(statistics.median(s.cached_tokens or 0 for s in hits)),
                    typical_s([s.ttft_s for s in hits]),
                ))
        for b, n in decode_points:
            out.decode.append(DecodePoint(
                b, context[b, n] + decode_tokens // 2, statistics.median(itl[b, n])
            ))
        out.speed_spread = speed_spread([itl[p] for p in decode_points])
        if out.speed_spread:
            out.speed_spread_window_s = statistics.median(
                (decode_tokens - 1) * d.itl_s for d in out.decode)
        for n, runs in burst.items():
            out.bursts.append(BurstPoint(n, burst_prompt_tokens, tuple(
                statistics.median(r[i] for r in runs) for i in range(n)
            )))
        if loaded:
            out.loaded.append(LoadedPoint(
                loaded_batch, loaded_ctx + loaded_decode_tokens // 2, burst_prompt_tokens,
                statistics.median(loaded),
            ))
        return out


def _q(xs: Sequence[float], q: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def _nonce() -> str:
    """:data:`NONCE_WORDS` random words of :data:`_WORDS`: a prompt opening that no other shares
    in any tokenizer that knows common words (a random string of letters would do in a subword
    tokenizer, but is one unknown token in a word-level one)."""
    return " ".join(_WORDS[b] for b in os.urandom(NONCE_WORDS))


#: A speed spread whose mean factor is above this makes `calibrate_endpoint` warn: the emulator
#: would run the profile that much slower on average than its typical speed.
SLOW_SPREAD_MEAN = 1.05


async def calibrate_endpoint(
    url: str,
    model: str,
    *,
    model_profile: str,
    base: str,
    name: str,
    tp: int = 1,
    precision: str = "bf16",
    prompt_tokens: Sequence[int] = (16, 64, 128, 256, 512, 768),
    batches: Sequence[int] = (1, 2, 4),
    bursts: Sequence[int] = (4,),
    decode_tokens: int = 64,
    repeats: int = 5,
    api_key: str | None = None,
    warm_up_max_s: float = WARM_UP_MAX_S,
    require_smooth: bool = True,
    between_rounds: Callable[[int], Awaitable[None]] | None = None,
    keep_speed_spread: bool = True,
    prefill_visits: int = PREFILL_VISITS,
    idle_tries: int = IDLE_TRIES,
    sweep_stream_tokens: int = SWEEP_STREAM_TOKENS,
    after_stream_tokens: int = AFTER_STREAM_TOKENS,
) -> tuple[str, str]:
    """Probe ``url``, fit ``base`` to it; return the profile file's text and a summary table.
    ``require_smooth=False`` calibrates even an engine whose streams still arrive in bursts
    after ``warm_up_max_s`` (tests on a loaded machine; its times then include the load).
    ``between_rounds``, ``prefill_visits``: see :meth:`Prober.run`. ``keep_speed_spread=False``
    leaves the probe's speed spread out of the profile (the emulator then runs at the typical
    speed). The profile's ``calibration`` keeps every cold prefill try (``prefill_tries_ms``,
    per requested length, in the order sent), the probe's own time (``probe_s``) and, when not
    1, ``sweep_stream_tokens`` (see :meth:`Prober.run`; absent: 1, as every profile before
    session 25), and with ``after_stream_tokens`` (0: none) the after-stream tries
    (``after_stream_tokens``, ``after_stream_tries_ms``). A CPU profile's peak FLOP/s is the one
    its fit achieved (:func:`~inferplane.physics.calibration.achieved_peak`), not the table's
    server's."""
    hw, mp = get_hardware(base), get_model(model_profile)
    result = await Prober(url, model, api_key=api_key).run(
        prompt_tokens, batches, bursts=bursts, decode_tokens=decode_tokens, repeats=repeats,
        warm_up_max_s=warm_up_max_s, require_smooth=require_smooth,
        between_rounds=between_rounds, prefill_visits=prefill_visits, idle_tries=idle_tries,
        sweep_stream_tokens=sweep_stream_tokens, after_stream_tokens=after_stream_tokens,
    )
    cal = fit(
        hw, mp, result.prefill + result.cached, result.decode, name=name, tp=tp,
        precision=precision, source=f"calibrated against {url} ({model}) from {base}",
    )
    cal = fit_after_stream(cal, mp, result.after_stream, tp=tp, precision=precision)
    cal = fit_frontend(cal, mp, result.bursts, result.loaded, tp=tp, precision=precision)
    if cal.hardware.kind == "cpu":
        cal = dataclasses.replace(cal, hardware=achieved_peak(cal.hardware))
    cal = dataclasses.replace(cal, hardware=dataclasses.replace(
        cal.hardware, idle_wake_s=round(idle_wake_s(result.idle_tries_s), 6)))
    if keep_speed_spread:
        cal = dataclasses.replace(cal, hardware=dataclasses.replace(
            cal.hardware, speed_spread=tuple(round(x, 4) for x in result.speed_spread),
            speed_spread_window_s=round(result.speed_spread_window_s, 6)))
    meta = {
        "endpoint": url,
        "model": model,
        "model_profile": model_profile,
        "tp": tp,
        "precision": precision,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "repeats": repeats,
        "prefill_visits": prefill_visits,
        "prefill_statistic": "median of the tries",
        "probe_s": round(result.probe_s, 1),
        "prefill_tries_ms": {n: [round(t * 1e3, 3) for t in ts]
                             for n, ts in result.prefill_tries_s.items()},
    }
    if sweep_stream_tokens != SWEEP_STREAM_TOKENS:  # absent: 1 (the default, profiles before 25)
        meta["sweep_stream_tokens"] = sweep_stream_tokens
    if result.after_stream:  # none: not measured (``after_stream_tokens=0``)
        meta["after_stream_tokens"] = after_stream_tokens
        meta["after_stream_tries_ms"] = {n: [round(t * 1e3, 3) for t in ts]
                                         for n, ts in result.after_stream_tries_s.items()}
    if result.idle_tries_s:  # none: not measured (``idle_tries=0``, ``--no-idle-wake``)
        meta["idle_gap_s"] = IDLE_GAP_S
        meta["idle_tries_ms"] = [[round(b * 1e3, 3), round(i * 1e3, 3)]
                                 for b, i in result.idle_tries_s]
    lines = [f"{'point':<28}{'measured ms':>13}{'fitted ms':>11}{'error':>8}"]
    for p, f in cal.prefill:
        label = f"prefill {p.prompt_tokens} tok" + (f" ({p.cached_tokens} cached)"
                                                     if p.cached_tokens else "")
        lines.append(f"{label:<28}{p.ttft_s * 1e3:>13.2f}{f * 1e3:>11.2f}"
                     f"{abs(f - p.ttft_s) / p.ttft_s:>8.1%}")
    for p, f in cal.after_stream:
        label = f"prefill {p.prompt_tokens} tok after stream"
        lines.append(f"{label:<28}{p.ttft_s * 1e3:>13.2f}{f * 1e3:>11.2f}"
                     f"{abs(f - p.ttft_s) / p.ttft_s:>8.1%}")
    for d, f in cal.decode:
        label = f"decode batch {d.batch}, {d.context_tokens} ctx"
        lines.append(f"{label:<28}{d.itl_s * 1e3:>13.2f}{f * 1e3:>11.2f}"
                     f"{abs(f - d.itl_s) / d.itl_s:>8.1%}")
    for b, ranks in cal.bursts:
        label = f"burst of {b.size} (spacing)"
        spacing = (ranks[-1] - ranks[0]) / (b.size - 1) if b.size > 1 else 0.0
        lines.append(f"{label:<28}{b.spacing_s * 1e3:>13.2f}{spacing * 1e3:>11.2f}")
    for lp, f in cal.loaded:
        label = f"{lp.prompt_tokens} tok beside {lp.batch} decoding"
        lines.append(f"{label:<28}{lp.ttft_s * 1e3:>13.2f}{f * 1e3:>11.2f}"
                     f"{abs(f - lp.ttft_s) / lp.ttft_s:>8.1%}")
    h = cal.hardware
    lines.append(
        f"fit: median error {cal.median_error:.1%}, max {cal.max_error:.1%}; "
        f"peak {h.peak_flops / 1e9:.4g} GFLOP/s x compute_efficiency "
        f"{h.compute_efficiency:.3g}, "
        f"attention x{h.attention_cost_factor:.3g}, bandwidth_efficiency "
        f"{h.bandwidth_efficiency:.3g}, step {h.step_overhead_s * 1e3:.3f} ms, per sequence "
        f"{h.seq_overhead_s * 1e3:.3f} ms, per context token {h.context_token_s * 1e6:.3f} us, "
        f"per request {h.request_overhead_s * 1e3:.3f} ms, "
        f"front-end intake {h.frontend_request_s * 1e3:.3f} ms + hand-off "
        f"{h.frontend_handoff_s * 1e3:.3f} ms, per token "
        f"{h.frontend_token_s * 1e3:.3f} ms, idle wake {h.idle_wake_s * 1e3:.3f} ms, "
        f"after a stream {h.after_stream_s * 1e3:.3f} ms + {h.after_stream_factor:.3f} x step"
        + (f", speed spread P10 / P50 / P90 {_q(h.speed_spread, 10):.3f} / "
           f"{_q(h.speed_spread, 50):.3f} / {_q(h.speed_spread, 90):.3f} over "
           f"{h.speed_spread_window_s * 1e3:.0f} ms, mean {statistics.fmean(h.speed_spread):.3f}"
           if len(h.speed_spread) > 1 else "")
    )
    if h.speed_spread and statistics.fmean(h.speed_spread) > SLOW_SPREAD_MEAN:
        lines.append(
            f"warning: the speed spread's mean is {statistics.fmean(h.speed_spread):.3f}: the "
            "engine ran slower for stretches of the probe (other work on its host?), and the "
            "emulator will run this profile that much slower on average than the simulator and "
            "the placement predictor, which use the typical speed. Calibrate on a calmer host, "
            "or pass --no-speed-spread to leave the spread out."
        )
    return dump_profile(cal, base, meta), "\n".join(lines)


@dataclass
class WorkloadResult:
    """Per-request TTFT and time per output token (after the first) of `run_workload`."""

    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    # the concurrency level of each entry of ``ttft_s`` / ``tpot_s`` (a stream with no time
    # per output token adds no ``tpot_s`` entry, so the two lists can differ in length)
    ttft_level: list[int] = field(default_factory=list)
    tpot_level: list[int] = field(default_factory=list)
    # the prompt size (of ``prompt_tokens``) each entry of ``ttft_s`` was sent with: at
    # concurrency 2 and 4 the closed loop's streams end and restart together, so that a level's
    # median falls between requests of different sizes and ranks of those bursts
    ttft_prompt: list[int] = field(default_factory=list)
    bursts: int = 0  # streams whose tokens all came at once (see `_Stream.burst`)


async def run_workload(
    url: str,
    model: str,
    *,
    prompt_tokens: Sequence[int] = (32, 128, 384, 768),
    output_tokens: int = 32,
    concurrency: Sequence[int] = (1, 2, 4),
    requests_per_level: int = 8,
    api_key: str | None = None,
) -> WorkloadResult:
    """The fidelity workload: at each concurrency level, closed-loop workers send
    ``requests_per_level`` fresh (uncached) prompts cycling through ``prompt_tokens``, each
    streamed with ``output_tokens`` output tokens; every request's TTFT and time per output
    token ((time to the last token − TTFT) over the tokens after the first) are kept."""
    prober = Prober(url, model, api_key=api_key)
    out = WorkloadResult()
    async with aiohttp.ClientSession(timeout=prober.timeout) as session:
        await prober.learn_words_per_token(session)
        for c in concurrency:
            todo = [prompt_tokens[i % len(prompt_tokens)] for i in range(requests_per_level)]

            async def worker(todo: list[int] = todo, c: int = c) -> None:
                while todo:
                    n = todo.pop()
                    s = await prober.stream(
                        session, prompt_of(prober.words_for(n), _nonce()), output_tokens
                    )
                    out.ttft_s.append(s.ttft_s)
                    out.ttft_level.append(c)
                    out.ttft_prompt.append(n)
                    out.bursts += s.burst
                    if s.completion_tokens > 1 and s.decode_s > 0:
                        out.tpot_s.append(s.decode_s / (s.completion_tokens - 1))
                        out.tpot_level.append(c)

            await asyncio.gather(*(worker() for _ in range(c)))
    return out
