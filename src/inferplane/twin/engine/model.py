"""An emulated vLLM (v1) engine: the scheduler, its KV cache and its timing, clock-agnostic.

One :class:`Engine` serves both the real-time HTTP emulator (call :meth:`Engine.step`, sleep
``duration_s`` scaled, repeat) and the offline simulator on a virtual clock (call
:meth:`Engine.step_many`, which fast-forwards steady decode). The engine never reads a
clock: the caller passes ``now`` and advances it by the returned ``duration_s``; tokens
produced by a step carry the timestamp ``now + duration_s``.

One step schedules one iteration the way ``vllm/v1/core/sched/scheduler.py`` does:

1. Running requests first, in order: a decoding request takes 1 token, a partially
   prefilled one the rest of its prompt (capped by ``long_prefill_token_threshold`` and the
   remaining token budget). If its KV blocks cannot be allocated, the last request of the
   running list (the latest scheduled: lowest priority under FCFS) is preempted by
   recomputation — blocks freed, progress reset, put at the front of the waiting queue —
   until the allocation fits or the request has preempted itself.
2. Then, only if nobody was preempted this step, waiting requests in FCFS order while token
   budget, ``max_num_seqs`` and free blocks allow (and only those that arrived by the step's
   start: a real-time caller may add a request a little after its arrival time). A request
   scheduled with no progress is looked up in the prefix cache first: it starts with its
   longest cached prefix of whole blocks, never its last token (a full hit recomputes the
   last block). With chunked prefill a prompt is split across steps by the budget; without
   it a prompt that does not fit the remaining budget waits.

Full blocks enter the prefix cache when they are allocated for computation (as vLLM does),
so a request scheduled later in the same step already hits them. A request emits a token in
the step that computes its last uncomputed token: its first token when the prefill
completes, then one per decode step. Output token ids are deterministic
(:func:`output_token_id`), so a follow-up turn that re-sends prompt + answer hits the cache.
Requests generate exactly ``max_tokens`` tokens (no EOS).

Step time is ``cost_model.step_time_s(prefill_tokens, prefill_context_tokens, decode_seqs,
decode_context_tokens)``: prefill tokens computed this step, the tokens already in KV for
those prefilling sequences, the number of decoding sequences and the sum of their context
lengths including the token being computed. A step with more than one prefill chunk also
passes ``prefill_pairs``, the attention pairs of each chunk against its own sequence summed
(each sequence attends only to its own keys).

Waking from idle: a request that reaches an engine with nothing running or waiting since at
least :data:`IDLE_WAKE_AFTER_S` before it arrived (or never used) makes the step that first
runs it ``idle_wake_s`` longer (the hardware profile's, measured by the calibration probe):
what a real engine's processes take to wake from their idle wait. The idle time counts from
the last request's finish or, when an abort empties the engine, from its last step's end; an
abort that empties the engine also drops a wake its requests had not yet paid.

Prefilling after decoding: a step that prefills (any prompt chunk) after a step that only
decoded, with no prefill between them, takes ``after_stream_s + after_stream_factor × its
time`` longer (the hardware profile's, measured by the calibration probe:
``HardwareProfile.after_stream_s``): what a real engine's prefill costs more right after it
streamed than right after another prefill. A closed loop's next request after a stream pays
it, and so does a request that joins decoding streams; a request after a one-token request
(a prefill step that produced its only token) does not. After an idle stretch the step pays
the larger of this and the idle wake, not their sum: the probe measures the wake after
one-token requests and the after-stream cost with no idle gap, never a stream, then idle, then
a request (session 28's review). Two cases the probe does not measure either: a stream of a
few tokens pays the whole term (the probe's streams are ``after_stream_tokens`` long, 32 by
default; session 27's 8-token streams gave about half the cost), so short streams are
over-charged; and the factor multiplies a mixed step's whole time, its decode part included
(fitted on lone prefills; unvalidated: the fidelity runs' c2/c4 gaps varied too much between
runs to tell).

Metrics: gauges and counters are attributes named after the vLLM series they feed; the
prefix-cache counters count, in tokens, the lookup of each request when it is first
scheduled (vLLM counts re-lookups after preemption apart, and also counts lookups whose
allocation then fails; neither is counted here). Latency observations (``queue``, ``ttft``,
``itl``, ``e2e``) are drained with :meth:`Engine.drain_samples`, grouped by equal value.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from inferplane.fleet.kv_events import KVEvent
from inferplane.tokenization import hash_block_tokens, salt_root
from inferplane.twin.engine.kv_cache import BlockPool
from inferplane.twin.engine.request import (
    EngineRequest,
    LatencySample,
    RequestStatus,
    StepOutput,
    output_token_id,
    output_word,
)

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineRequest",
    "LatencySample",
    "RequestStatus",
    "StepCostModel",
    "StepOutput",
    "output_token_id",
    "output_word",
]


class StepCostModel(Protocol):
    """Duration of one engine iteration (``inferplane.physics.Roofline`` implements it)."""

    def step_time_s(
        self,
        prefill_tokens: int,
        prefill_context_tokens: int,
        decode_seqs: int,
        decode_context_tokens: int,
        prefill_pairs: float | None = None,
    ) -> float: ...


IDLE_WAKE_AFTER_S = 0.03
"""Idle time (nothing running or waiting) after which a request pays the engine's
``idle_wake_s``: a step where the real cost ramps. On the fidelity vLLM (session 24's host,
384-token requests after a 32-token stream, medians of 14) the extra TTFT over a request sent
as the previous one ended (73 us later: idle_gap.py's own closed loop, the kind the fidelity
workload runs, whose turnaround was not measured) was 0 after 1-3
ms of idle, +0.45 ms after 10, +1.3 after 20, +2.4 after 50 and +3.2 after 100 and 200 ms
(``calibration-s24/idle_gap.txt``): half the full cost at about 30 ms, where a step errs least
either way."""

MAX_DERIVED_BLOCKS = 1 << 17
"""Upper bound on KV blocks derived from memory (2M tokens at block size 16): a small model on
a large host (the ``cpu`` profile) would otherwise derive millions of blocks, which the engine
model allocates up front. The emulator and the simulator cap at the same bound."""


@dataclass(slots=True)
class EngineConfig:
    """vLLM's scheduler and cache settings (same names and defaults as its CLI flags)."""

    num_gpu_blocks: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0  # 0 = off

    def __post_init__(self) -> None:
        if min(self.num_gpu_blocks, self.max_num_seqs, self.max_num_batched_tokens) <= 0:
            raise ValueError("num_gpu_blocks, max_num_seqs, max_num_batched_tokens must be > 0")
        if self.block_size <= 0 or self.long_prefill_token_threshold < 0:
            raise ValueError("block_size must be > 0 and long_prefill_token_threshold >= 0")


class Engine:
    """A vLLM v1 scheduler over a :class:`BlockPool`, timed by a :class:`StepCostModel`."""

    def __init__(
        self,
        config: EngineConfig,
        cost_model: StepCostModel,
        on_kv_event: Callable[[KVEvent], None] | None = None,
        record_samples: bool = True,
        idle_wake_s: float = 0.0,
        idle_wake_after_s: float = IDLE_WAKE_AFTER_S,
        after_stream_s: float = 0.0,
        after_stream_factor: float = 0.0,
    ) -> None:
        self.config = config
        self.idle_wake_s, self.idle_wake_after_s = idle_wake_s, idle_wake_after_s
        self.after_stream_s, self.after_stream_factor = after_stream_s, after_stream_factor
        self._decoded = False  # a step only decoded since the last step that prefilled
        self._idle_since = -math.inf  # when the last request finished (never: always idle)
        self._wake_s = 0.0  # owed by the next step that runs something
        self._last_step_end = -math.inf  # when the last step that ran something ended
        self.cost_model = cost_model
        self.pool = BlockPool(
            config.num_gpu_blocks, config.block_size, config.enable_prefix_caching, on_kv_event
        )
        self.record_samples = record_samples
        self._waiting: deque[EngineRequest] = deque()
        self._running: list[EngineRequest] = []
        self._requests: dict[str, EngineRequest] = {}
        self._samples: list[LatencySample] = []
        self._lazy: _LazyDecode | None = None  # single decode steps not yet applied
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_preemptions_total = 0
        self.num_finished_total = 0

    # -- gauges and counters (vLLM metric sources) -------------------------------------------
    @property
    def num_running(self) -> int:
        """``vllm:num_requests_running``."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """``vllm:num_requests_waiting`` (preempted requests included)."""
        return len(self._waiting)

    @property
    def kv_usage(self) -> float:
        """``vllm:kv_cache_usage_perc`` (0–1)."""
        lazy, pool = self._lazy, self.pool
        if lazy is None or not lazy.pending_blocks:
            return pool.usage
        # as `BlockPool.usage` after the blocks the pending decode steps take
        return 1.0 - (pool.num_free_blocks - lazy.pending_blocks) / pool.num_blocks

    @property
    def prefix_queries_total(self) -> int:
        """``vllm:prefix_cache_queries`` (tokens)."""
        return self.pool.prefix_queries_tokens

    @property
    def prefix_hits_total(self) -> int:
        """``vllm:prefix_cache_hits`` (tokens)."""
        return self.pool.prefix_hits_tokens

    def drain_samples(self) -> list[LatencySample]:
        """Latency observations since the last drain (empty if ``record_samples`` is off)."""
        out, self._samples = self._samples, []
        return out

    def _sample(self, kind: str, seconds: float, count: int = 1) -> None:
        if self.record_samples:
            self._samples.append(LatencySample(kind, seconds, count))

    # -- requests -----------------------------------------------------------------------------
    def add_request(self, req: EngineRequest, now: float) -> None:
        """Queue ``req`` (FCFS). Raises ``ValueError`` for a request that could never run."""
        cfg = self.config
        if req.request_id in self._requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if req.prompt_len < 1 or req.max_tokens < 1:
            raise ValueError("a request needs at least one prompt token and max_tokens >= 1")
        peak = req.prompt_len + req.max_tokens - 1  # tokens in KV when the last one is sampled
        if math.ceil(peak / cfg.block_size) > cfg.num_gpu_blocks:
            raise ValueError(f"request needs {peak} tokens of KV, more than the engine holds")
        if not cfg.enable_chunked_prefill and peak > cfg.max_num_batched_tokens:
            raise ValueError("without chunked prefill a request must fit max_num_batched_tokens")
        hashes = req.prompt_block_hashes
        if hashes is not None and len(hashes) != req.prompt_len // cfg.block_size:
            raise ValueError("prompt_block_hashes must name every full block of the prompt")
        del now  # arrival_time is the request's own; kept for interface symmetry
        if (
            self.idle_wake_s > 0
            and not self._requests
            and req.arrival_time - self._idle_since >= self.idle_wake_after_s
        ):
            self._wake_s = self.idle_wake_s
        self._requests[req.request_id] = req
        self._waiting.append(req)

    def get_request(self, request_id: str) -> EngineRequest | None:
        """An unfinished request by id."""
        self._settle()
        return self._requests.get(request_id)

    def abort(self, request_id: str) -> bool:
        """Drop an unfinished request and free its blocks; False if unknown or finished."""
        self._settle()
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        if req.status is RequestStatus.RUNNING:
            self._running.remove(req)
        else:
            self._waiting.remove(req)
        self._release(req, RequestStatus.ABORTED)
        if not self._requests:
            # the engine went idle now: it held work until its last step's end, and a wake
            # owed to requests that never ran is owed to nobody (the next arrival decides anew)
            self._idle_since = max(self._idle_since, self._last_step_end)
            self._wake_s = 0.0
        return True

    def first_arrival(self) -> float | None:
        """The arrival time of the request at the head of the waiting queue (None: empty)."""
        return self._waiting[0].arrival_time if self._waiting else None

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self._running or self._waiting)

    def reset_prefix_cache(self) -> bool:
        """Clear the prefix cache (refused while blocks are in use, as in vLLM)."""
        self._settle()
        return self.pool.reset_prefix_cache()

    # -- KV bookkeeping -----------------------------------------------------------------------
    def _ensure_hashes(self, req: EngineRequest, num_blocks: int) -> list[int]:
        hashes, given = req.hashes, req.prompt_block_hashes
        if given is not None and len(hashes) < min(num_blocks, len(given)):
            hashes.extend(given[len(hashes) : num_blocks])
        bs = self.config.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else salt_root(req.cache_salt)
            hashes.append(hash_block_tokens(parent, req.token_ids(i * bs, (i + 1) * bs)))
        return hashes

    def _new_blocks(self, req: EngineRequest, computed: int, n: int, hits: Sequence[int]) -> int:
        """Blocks ``req`` must take from the free queue to compute ``n`` more tokens, or -1."""
        new = max(-(-(computed + n) // self.config.block_size) - len(req.block_ids) - len(hits), 0)
        pool = self.pool
        return -1 if new + (pool.num_evictable(hits) if hits else 0) > pool.num_free_blocks else new

    def _allocate(
        self, req: EngineRequest, computed: int, n: int, hits: Sequence[int] = ()
    ) -> bool:
        """Give ``req`` blocks for ``computed + n`` tokens after prefix ``hits``; False if short."""
        pool, total = self.pool, computed + n
        new = self._new_blocks(req, computed, n, hits)
        if new < 0:
            return False
        if hits:
            pool.touch(hits)
            req.block_ids.extend(hits)
            req.num_cached_blocks = len(hits)
        if new > 0:
            req.block_ids.extend(pool.allocate(new))
        self._cache_full_blocks(req, min(total, req.num_tokens))
        return True

    def _cache_full_blocks(self, req: EngineRequest, upto_tokens: int) -> None:
        bs = self.config.block_size
        nfull, start = upto_tokens // bs, req.num_cached_blocks
        if nfull <= start or not self.config.enable_prefix_caching:
            return
        hashes = self._ensure_hashes(req, nfull)
        tokens = None
        if self.pool.on_event is not None:

            def tokens() -> list[int]:
                return req.token_ids(start * bs, nfull * bs)

        self.pool.cache_blocks(
            req.block_ids[start:nfull],
            hashes[start:nfull],
            hashes[start - 1] if start else None,
            tokens,
        )
        req.num_cached_blocks = nfull

    def _release(self, req: EngineRequest, status: RequestStatus) -> None:
        self.pool.free(reversed(req.block_ids))
        req.block_ids = []
        req.num_cached_blocks = 0
        req.status = status
        if status is not RequestStatus.PREEMPTED:
            req.hashes = []  # the chain is only needed to schedule; free it for long replays

    def _preempt(self, req: EngineRequest, out: StepOutput) -> None:
        self._release(req, RequestStatus.PREEMPTED)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        self._waiting.appendleft(req)
        out.preempted.append(req.request_id)

    # -- scheduling ---------------------------------------------------------------------------
    def _cap(self, n: int, budget: int) -> int:
        thr = self.config.long_prefill_token_threshold
        if thr and n > thr:
            n = thr
        return min(n, budget)

    def _plan_prefill(
        self, req: EngineRequest, budget: int
    ) -> tuple[int, int, list[int]] | None:
        """(cached tokens, tokens to compute, hit blocks) for a waiting request, or None."""
        cfg, hits = self.config, []
        if cfg.enable_prefix_caching:  # waiting requests have no progress
            max_hit_blocks = (req.num_tokens - 1) // cfg.block_size
            hits = self.pool.lookup(self._ensure_hashes(req, max_hit_blocks)[:max_hit_blocks])
        computed = len(hits) * cfg.block_size
        n = req.num_tokens - computed
        if not cfg.enable_chunked_prefill and n > budget:
            return None
        return computed, self._cap(n, budget), hits

    def _waiting_blocked(self, budget: int) -> bool:
        """Whether the head of the waiting queue cannot be scheduled with ``budget`` left."""
        if not self._waiting or budget <= 0 or len(self._running) >= self.config.max_num_seqs:
            return True
        req = self._waiting[0]
        plan = self._plan_prefill(req, budget)
        return plan is None or self._new_blocks(req, *plan) < 0

    def _schedule(self, now: float, out: StepOutput) -> list[tuple[EngineRequest, int]]:
        cfg, pool = self.config, self.pool
        budget = cfg.max_num_batched_tokens
        sched: list[tuple[EngineRequest, int]] = []
        running = self._running
        bs, caching = cfg.block_size, cfg.enable_prefix_caching
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            c = req.num_computed_tokens
            left = req.prompt_len + req.num_output_tokens - c
            if (
                left == 1
                and c < len(req.block_ids) * bs
                and (not caching or (c + 1) // bs <= req.num_cached_blocks)
            ):
                # one token inside its own blocks, filling none: `_allocate` would take no
                # block and cache none (the hot path of a decode step)
                sched.append((req, 1))
                budget -= 1
                i += 1
                continue
            n = self._cap(left, budget)
            while not self._allocate(req, req.num_computed_tokens, n):
                victim = running.pop()
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                sched.append((req, n))
                budget -= n
                i += 1
        if out.preempted:
            return sched
        waiting = self._waiting
        while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
            req = waiting[0]
            if req.arrival_time > now:
                # not in the queue yet when this step starts: a real-time caller (the emulator)
                # adds a request when its handler gets to run, up to a millisecond or two after
                # it arrived by the model, and may start a step at an earlier engine time
                break
            plan = self._plan_prefill(req, budget)
            if plan is None or not self._allocate(req, *plan):
                break
            computed, n, _ = plan
            waiting.popleft()
            # vLLM counts the lookups of preempted requests apart; these are first lookups.
            if cfg.enable_prefix_caching and req.status is RequestStatus.WAITING:
                pool.record_prefix_query(req.num_tokens, computed)
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = computed
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
                self._sample("queue", now - req.arrival_time)
            req.num_computed_tokens = computed
            req.status = RequestStatus.RUNNING
            running.append(req)
            sched.append((req, n))
            budget -= n
        return sched

    def step(self, now: float) -> StepOutput:
        """Schedule and execute one iteration starting at ``now``.

        Returns ``duration_s == 0`` and no tokens when there is nothing to run.
        """
        self._settle()
        out = StepOutput(start_s=now, duration_s=0.0)
        sched = self._schedule(now, out)
        if not sched:
            out.step_durations.append(0.0)
            return out
        pf_tok = pf_ctx = dec_n = dec_ctx = 0
        pf_pairs = 0.0  # each prefill chunk attends to its own sequence: sum of n (c + n/2)
        chunks = 0
        for req, n in sched:
            c = req.num_computed_tokens
            if n == 1 and req.num_output_tokens and c == req.prompt_len + req.num_output_tokens - 1:
                dec_n += 1
                dec_ctx += c + 1
            else:
                pf_tok += n
                pf_ctx += c
                pf_pairs += n * (c + 0.5 * n)
                chunks += 1
        cost = self.cost_model.step_time_s
        dur = (
            cost(pf_tok, pf_ctx, dec_n, dec_ctx)
            if chunks <= 1  # one chunk: the same pairs, the one-sequence formula's float ops
            else cost(pf_tok, pf_ctx, dec_n, dec_ctx, prefill_pairs=pf_pairs)
        )
        extra = 0.0
        if chunks:
            if self._decoded:  # a prefill after decode steps (the module docstring)
                extra = self.after_stream_s + self.after_stream_factor * dur
            self._decoded = False
        elif dec_n:
            self._decoded = True
        if self._wake_s:
            # the first step after an idle stretch (`add_request`): the larger of the wake and
            # the after-stream cost, not both (the probe measured neither after the other)
            extra = max(extra, self._wake_s)
            self._wake_s = 0.0
        dur += extra
        out.duration_s, out.prefill_tokens, out.decode_seqs = dur, pf_tok, dec_n
        out.step_durations.append(dur)
        t = self._last_step_end = now + dur
        itl: dict[float, int] = {}
        for req, n in sched:
            req.num_computed_tokens += n
            if req.num_computed_tokens < req.prompt_len + req.num_output_tokens:
                continue  # a prefill chunk that does not finish the prompt
            if req.first_token_time is None:
                req.first_token_time = t
                self.prompt_tokens_total += req.prompt_len
                self._sample("ttft", t - req.arrival_time)
            elif req.last_token_time is not None:
                gap = t - req.last_token_time
                itl[gap] = itl.get(gap, 0) + 1
            req.last_token_time = t
            req.num_output_tokens += 1
            out.new_tokens[req.request_id] = 1
            if req.num_output_tokens >= req.max_tokens:
                self._finish(req, t, out)
        self.generation_tokens_total += len(out.new_tokens)
        for gap, count in itl.items():
            self._sample("itl", gap, count)
        if out.finished:
            self._running = [r for r in self._running if r.status is RequestStatus.RUNNING]
        return out

    def _finish(self, req: EngineRequest, t: float, out: StepOutput) -> None:
        req.finish_time = t
        self._release(req, RequestStatus.FINISHED)
        del self._requests[req.request_id]
        if not self._requests:
            self._idle_since = t
        self.num_finished_total += 1
        out.finished.append(req.request_id)
        self._sample("e2e", t - req.arrival_time)

    # -- fast-forward -------------------------------------------------------------------------
    def step_many(
        self, now: float, until: float = math.inf, max_steps: int = 1 << 30
    ) -> StepOutput:
        """Run one step, or several pure-decode steps at once when that changes nothing.

        When every running request is decoding and the head of the waiting queue (if any)
        cannot be scheduled — ``max_num_seqs`` reached, or too few free blocks, which decode
        only makes fewer — the next ``k`` steps are computed at once: the same durations,
        tokens, blocks and samples as ``k`` calls of :meth:`step`, grouped into one
        :class:`StepOutput` (``num_steps = k``, per-step ``step_durations``). The run stops
        after the step in which the first request finishes, before a step that would run out
        of free blocks, before a step that would start at or after ``until`` (the first step
        always runs) and at ``max_steps``. Otherwise it is :meth:`step`.

        Assumes the blocks decode fills never extend a waiting prompt's cached prefix (that
        would need another request's generated tokens to equal the prompt's next block).

        A single decode step that finishes nobody (the next step may start at ``until``: the
        caller must look again before it) is applied lazily (`_LazyDecode`): its duration,
        tokens, samples and gauges are as a plain step's, but the requests' progress and the
        blocks it takes and fills are applied only when the run of such steps ends (any other
        step, a lookup, `get_request`, `abort`), in the order plain steps would have applied
        them — the same blocks, evictions and cache as step by step, at O(1) per step instead of
        O(running requests).
        """
        if self._lazy is not None:
            out = self._lazy_step(now, until, max_steps)
            if out is not None:
                return out
        out = self._decode_run(now, until, max_steps)
        return out if out is not None else self.step(now)

    def _decode_blocks_needed(self, k: int) -> int:
        bs = self.config.block_size
        return sum(
            max(0, -(-(r.num_computed_tokens + k) // bs) - len(r.block_ids)) for r in self._running
        )

    def _decode_run(self, now: float, until: float, max_steps: int) -> StepOutput | None:
        running, pool = self._running, self.pool
        budget = self.config.max_num_batched_tokens - len(running)
        if not running or budget < 0 or not self._waiting_blocked(budget):
            return None
        left, ctx0, need1 = 1 << 62, 0, 0
        bs = self.config.block_size
        for r in running:
            out_n = r.num_output_tokens
            c = r.num_computed_tokens
            if out_n == 0 or c != r.prompt_len + out_n - 1:
                return None  # somebody is (re)prefilling
            if r.max_tokens - out_n < left:
                left = r.max_tokens - out_n
            ctx0 += c + 1
            if c >= len(r.block_ids) * bs:
                need1 += 1  # its next token starts a block (`_decode_blocks_needed(1)`)
        k = min(max_steps, left)
        n = len(running)
        d0 = self.cost_model.step_time_s(0, 0, n, ctx0)
        if k < 2 or now + d0 >= until:
            # one step only: what a plain step does, without scheduling it request by request
            if need1 > pool.num_free_blocks:
                return None  # a plain step preempts
            if left >= 2 and pool.on_event is None:
                lazy = _LazyDecode.start(self, now, d0, ctx0 + n, left - 1)
                if lazy is not None:
                    return lazy
            return self._decode_steps(now, [d0], now + d0, d0)
        if self._decode_blocks_needed(k) > pool.num_free_blocks:
            lo, hi = 0, k  # need(lo) fits, need(hi) does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if self._decode_blocks_needed(mid) <= pool.num_free_blocks:
                    lo = mid
                else:
                    hi = mid
            k = lo
        t, durs = now + d0, [d0]
        cost = self.cost_model.step_time_s
        for j in range(1, k):
            if t >= until:
                break
            d = cost(0, 0, n, ctx0 + n * j)
            durs.append(d)
            t += d
        if len(durs) < 2:
            return None  # a plain step does the same (and handles preemption)
        return self._decode_steps(now, durs, t, t - now)

    def _decode_steps(
        self, now: float, durs: list[float], t: float, duration_s: float
    ) -> StepOutput:
        """Apply ``len(durs)`` decode steps to every running request (`_decode_run` checked
        that they may run and that the free blocks suffice); the last token is at ``t``."""
        running, pool, k = self._running, self.pool, len(durs)
        self._last_step_end = t
        self._decoded = True
        n = len(running)
        out = StepOutput(now, duration_s, num_steps=k, step_durations=durs, decode_seqs=n)
        t1, first_gaps = now + durs[0], dict[float, int]()
        bs = self.config.block_size
        new_tokens = out.new_tokens
        for r in running:
            if r.last_token_time is not None:
                gap = t1 - r.last_token_time
                first_gaps[gap] = first_gaps.get(gap, 0) + 1
            c = r.num_computed_tokens + k
            add = -(-c // bs) - len(r.block_ids)
            if add > 0:
                r.block_ids.extend(pool.allocate(add))
            r.num_computed_tokens = c
            r.num_output_tokens += k
            if c // bs > r.num_cached_blocks:  # a block filled: name it (`_cache_full_blocks`)
                self._cache_full_blocks(r, c)
            r.last_token_time = t
            new_tokens[r.request_id] = k
            if r.num_output_tokens >= r.max_tokens:
                self._finish(r, t, out)
        self.generation_tokens_total += n * k
        for gap, count in first_gaps.items():
            self._sample("itl", gap, count)
        for d in durs[1:]:
            self._sample("itl", d, n)
        if out.finished:
            self._running = [r for r in running if r.status is RequestStatus.RUNNING]
        return out

    def _lazy_step(self, now: float, until: float, max_steps: int) -> StepOutput | None:
        """One more lazy decode step (`step_many`), or None after applying the pending ones
        when this step is not one: it would finish a request, run short of blocks, need a
        lookup for the waiting queue, or be followed by another before ``until``."""
        lazy, running = self._lazy, self._running
        assert lazy is not None
        n, cfg = len(running), self.config
        budget = cfg.max_num_batched_tokens - n
        if (
            lazy.left < 2
            or budget < 0
            or (self._waiting and budget > 0 and n < cfg.max_num_seqs)  # `_waiting_blocked`
        ):
            self._settle()
            return None
        cross = len(lazy.groups[lazy.steps % cfg.block_size + 1])  # blocks this step takes
        if cross > self.pool.num_free_blocks - lazy.pending_blocks:
            self._settle()
            return None
        d = self.cost_model.step_time_s(0, 0, n, lazy.ctx)
        t = now + d
        if max_steps >= 2 and t < until:
            self._settle()  # a multi-step run may go: `_decode_run`
            return None
        self._sample("itl", t - lazy.last_token_time, n)  # every request's gap is the same
        lazy.steps += 1
        lazy.pending_blocks += cross
        lazy.ctx += n
        lazy.last_token_time = self._last_step_end = t
        self._decoded = True
        lazy.left -= 1
        self.generation_tokens_total += n
        return StepOutput(now, d, new_tokens=lazy.new_tokens, step_durations=[d], decode_seqs=n)

    def _settle(self) -> None:
        """Apply the pending lazy decode steps (`_LazyDecode`), if any."""
        lazy = self._lazy
        if lazy is None:
            return
        self._lazy = None
        lazy.apply(self)


@dataclass(slots=True)
class _LazyDecode:
    """Single decode steps of every running request, counted but not yet applied.

    While every running request decodes and no step finishes one, a step changes each request
    the same way (one more token, at the step's end time) and takes a block for the requests
    whose next token starts one, fills (names) a block for those whose token completes one.
    Which requests those are repeats every ``block_size`` steps: ``groups[f]`` holds the
    requests (with their position in the running list) whose first new block is taken at step
    ``f`` (1 … ``block_size``); they fill one at steps ``f - 1 + m × block_size``. `apply`
    replays the takes and fills of every counted step in the order plain steps make them.
    """

    steps: int  # steps counted (the first included)
    ctx: int  # Σ context of the running requests at the next step (its cost)
    left: int  # tokens the closest-to-done request still needs after the counted steps
    last_token_time: float
    pending_blocks: int  # blocks the counted steps take
    groups: list[list[tuple[int, EngineRequest]]]
    new_tokens: dict[str, int]  # one token for each running request (shared by the steps)

    @classmethod
    def start(
        cls, engine: Engine, now: float, d0: float, ctx: int, left: int
    ) -> StepOutput | None:
        """The first lazy step (`Engine._decode_run` checked that it may run), or None when
        a request's block table is not as a decode step leaves it (then a plain step)."""
        running, bs = engine._running, engine.config.block_size
        caching = engine.config.enable_prefix_caching
        groups: list[list[tuple[int, EngineRequest]]] = [[] for _ in range(bs + 1)]
        for i, r in enumerate(running):
            c = r.num_computed_tokens
            f = len(r.block_ids) * bs - c + 1
            if not 1 <= f <= bs or (caching and r.num_cached_blocks != c // bs):
                return None
            groups[f].append((i, r))
        t = now + d0
        gaps: dict[float, int] = {}
        for r in running:
            if r.last_token_time is not None:
                gap = t - r.last_token_time
                gaps[gap] = gaps.get(gap, 0) + 1
        for gap, count in gaps.items():
            engine._sample("itl", gap, count)
        n = len(running)
        engine.generation_tokens_total += n
        engine._last_step_end = t
        engine._decoded = True
        lazy = cls(1, ctx, left, t, len(groups[1]), groups, {r.request_id: 1 for r in running})
        engine._lazy = lazy
        return StepOutput(now, d0, new_tokens=lazy.new_tokens, step_durations=[d0], decode_seqs=n)

    def apply(self, engine: Engine) -> None:
        """Make the counted steps real: per step, in running order, take the block of each
        request whose token starts one and name the block each request's token completes
        (what `Engine._decode_steps` does at each of them), then advance every request."""
        bs, pool, groups = engine.config.block_size, engine.pool, self.groups
        caching = engine.config.enable_prefix_caching
        by_phase: list[list[tuple[int, int, EngineRequest]] | None] = [None] * bs
        for s in range(1, self.steps + 1):
            ops = by_phase[s % bs]  # the takes and fills of a step repeat every block_size
            if ops is None:
                take = groups[(s - 1) % bs + 1]
                fill = groups[s % bs + 1] if caching else []
                ops = by_phase[s % bs] = sorted(
                    [(i, 0, r) for i, r in take] + [(i, 1, r) for i, r in fill]
                )
            for _, kind, r in ops:
                if kind == 0:
                    r.block_ids.extend(pool.allocate(1))
                else:
                    engine._cache_full_blocks(r, r.num_computed_tokens + s)
        k, t = self.steps, self.last_token_time
        for r in engine._running:
            r.num_computed_tokens += k
            r.num_output_tokens += k
            r.last_token_time = t
