"""The simulator's fleet: one emulated engine per endpoint, and trace prompts as token ids (the
traffic mix is :mod:`inferplane.twin.simulator.mix`).

A trace request is known only by its length and (Mooncake) its 512-token block ids. Two things
are built from the ids, each a hash chain so that two requests share a leading run of hashes
exactly when they share a leading run of block ids:

* **engine tokens and block hashes** — trace block ``b`` is the token run
  ``b * 512 + i`` (``i < 512``; the last block is cut to ``input_length``), so no two blocks
  share a token. The engine is handed these tokens lazily (:class:`TracePromptTokens`) together
  with the chained hashes of its full KV blocks (:func:`engine_block_hashes`), which saves
  hashing ~12k tokens a request; prefix sharing in its KV cache is the trace's, exactly.
* **placement block hashes** — what ``prompt_block_hashes(model, text, prefix_block_chars)``
  would give for the prompt text a replay sends
  (:func:`~inferplane.twin.traces.tokens.prompt_from_blocks`: one word a token,
  :data:`CHARS_PER_TOKEN` characters a word on average), reproduced without building the
  text: hash ``k`` covers characters ``[0, (k + 1) * block_chars)``, i.e. tokens up to
  ``(k + 1) * block_chars / CHARS_PER_TOKEN``, so it is chained over every trace block those
  tokens touch (:func:`placement_block_hashes`). Same count and same sharing structure as the
  text hashes (up to where a word boundary falls), at a fraction of the cost.

Requests without prefix information (Azure) get fresh ids of their own
(:data:`SYNTHETIC_ID_BASE` upwards), which share nothing; so do the blocks of a prompt longer
than its ids cover.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from hashlib import blake2b
from itertools import repeat
from typing import overload

from inferplane.fleet.engine_metrics import EngineMetrics
from inferplane.fleet.model import Endpoint
from inferplane.physics import Roofline
from inferplane.physics.frontend import FrontEnd
from inferplane.twin.engine.model import (
    MAX_DERIVED_BLOCKS,
    Engine,
    EngineConfig,
    StepOutput,
)
from inferplane.twin.simulator.records import RequestRecord
from inferplane.twin.traces.tokens import TRACE_BLOCK_TOKENS, VOCABULARY

_MASK64 = (1 << 64) - 1
SYNTHETIC_ID_BASE = 1 << 40
"""Block ids from here up are made up by the simulator (padding, Azure prompts)."""

CHARS_PER_TOKEN = sum(len(w) + 1 for w in VOCABULARY) / len(VOCABULARY)
"""Mean characters per token (a word and its space) of the replayed prompt text."""

MAX_ELASTIC_BLOCKS = 1 << 20
"""Cap on KV blocks of an elastic (provider-api) engine, whose nominal pool is unbounded."""


def seed_of(text: str) -> int:
    """A stable 64-bit seed for a string (Python's ``hash(str)`` is randomised per process)."""
    return int.from_bytes(blake2b(text.encode(), digest_size=8).digest(), "little")


def _chain(seed: int, ids: Sequence[int], upto: int) -> list[int]:
    """``c_j = H(c_{j-1}, ids[j])`` for ``j < upto``, ``c_{-1} = seed``."""
    out: list[int] = []
    prev = seed
    for j in range(upto):
        prev = hash((prev, ids[j]))
        out.append(prev)
    return out


_TRACE_BLOCK_OF: dict[int, list[int]] = {}  # block_size -> trace block of each KV block


def _trace_block_of(block_size: int, n: int) -> list[int]:
    """``[((m + 1) * block_size - 1) // 512 for m < n]``, grown and cached per block size."""
    table = _TRACE_BLOCK_OF.setdefault(block_size, [])
    if len(table) < n:
        tb = TRACE_BLOCK_TOKENS
        table.extend(((m + 1) * block_size - 1) // tb for m in range(len(table), 2 * n))
    return table


def engine_block_hashes(ids: Sequence[int], prompt_len: int, block_size: int) -> list[int]:
    """Chained hashes of the prompt's full KV blocks: block ``m`` is named by the chain of every
    trace block its tokens touch, and ``m``: ``hash((chain[j], m)) & 2**64 - 1`` where ``j`` is
    the trace block of the block's last token (computed a trace block's run of KV blocks at a
    time, in C)."""
    n = prompt_len // block_size
    if n == 0:
        return []
    jof = _trace_block_of(block_size, n)
    chain = _chain(0x5EED, ids, jof[n - 1] + 1)
    out: list[int] = []
    mask, m = _MASK64.__and__, 0
    for j, c in enumerate(chain):
        # KV blocks whose last token lies in trace block j: m < (j + 1) * 512 // block_size
        end = min(n, (j + 1) * TRACE_BLOCK_TOKENS // block_size)
        out.extend(map(mask, map(hash, zip(repeat(c), range(m, end)))))
        m = max(m, end)
    return out


@lru_cache(maxsize=8)
def _hash_block_ends(block_chars: int, max_blocks: int) -> tuple[int, ...]:
    """Last token (0-based) that placement hash block ``k`` covers in a long enough prompt."""
    per = block_chars / CHARS_PER_TOKEN
    return tuple(math.ceil((k + 1) * per) - 1 for k in range(max_blocks))


def placement_block_hashes(
    model_seed: int,
    ids: Sequence[int],
    prompt_tokens: int,
    block_chars: int = 256,
    max_blocks: int = 512,
) -> tuple[int, ...]:
    """The stand-in for ``prompt_block_hashes`` of the replayed text (module docstring)."""
    text_chars = prompt_tokens * CHARS_PER_TOKEN - 1
    n = min(int(text_chars // block_chars), max_blocks)
    if n <= 0:
        return ()
    ends = _hash_block_ends(block_chars, max_blocks)
    last = prompt_tokens - 1
    tb = TRACE_BLOCK_TOKENS
    chain = _chain(model_seed, ids, min(ends[n - 1], last) // tb + 1)
    # hash k is hash((chain[min(ends[k], last) // 512], k)) & 2**64 - 1: computed a run of k
    # sharing one trace block at a time, in C
    out: list[int] = []
    mask, k = _MASK64.__and__, 0
    for j, c in enumerate(chain):
        bound = (j + 1) * tb
        end = n if bound > last else min(n, bisect_left(ends, bound))
        out.extend(map(mask, map(hash, zip(repeat(c), range(k, end)))))
        k = max(k, end)
    return tuple(out)


class TracePromptTokens(Sequence[int]):
    """The prompt's token ids, computed on demand: block ``ids[j]`` is ``ids[j] * 512 + i``."""

    __slots__ = ("_ids", "_len")

    def __init__(self, ids: Sequence[int], length: int) -> None:
        self._ids = ids
        self._len = length

    def __len__(self) -> int:
        return self._len

    def _at(self, i: int) -> int:
        b, r = divmod(i, TRACE_BLOCK_TOKENS)
        return self._ids[b] * TRACE_BLOCK_TOKENS + r

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> list[int]: ...
    def __getitem__(self, index: int | slice) -> int | list[int]:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._len)
            if step != 1:
                return [self._at(i) for i in range(start, stop, step)]
            out: list[int] = []
            tb, ids = TRACE_BLOCK_TOKENS, self._ids
            while start < stop:  # a run of consecutive ids per trace block
                b, r = divmod(start, tb)
                n = min(stop - start, tb - r)
                base = ids[b] * tb + r
                out.extend(range(base, base + n))
                start += n
            return out
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(index)
        return self._at(index)

    def __iter__(self) -> Iterator[int]:
        return (self._at(i) for i in range(self._len))


def padded_ids(hash_ids: Sequence[int], prompt_tokens: int, next_id: int) -> tuple[list[int], int]:
    """Block ids covering ``prompt_tokens`` tokens: the trace's, then fresh synthetic ids.

    Returns the ids and the next unused synthetic id.
    """
    need = max(1, -(-prompt_tokens // TRACE_BLOCK_TOKENS))
    ids = list(hash_ids[:need])
    while len(ids) < need:
        ids.append(next_id)
        next_id += 1
    return ids, next_id


def engine_config_for(endpoint: Endpoint, roofline: Roofline) -> EngineConfig:
    """The endpoint's ``emulation`` block as an `EngineConfig`; KV blocks from the roofline
    (``kv_blocks(block_size, gpu_memory_utilization)``) unless set, capped on elastic hardware
    at what ``max_num_seqs`` sequences of the longest context need, else at
    `MAX_DERIVED_BLOCKS` as in the emulator."""
    em = endpoint.spec.emulation
    blocks = em.num_gpu_blocks
    if blocks is None:
        blocks = roofline.kv_blocks(em.block_size, em.gpu_memory_utilization)
        if roofline.hardware.elastic:
            ctx = max(m.max_context for m in endpoint.spec.models)
            blocks = min(blocks, -(-em.max_num_seqs * ctx // em.block_size), MAX_ELASTIC_BLOCKS)
        else:
            blocks = min(blocks, MAX_DERIVED_BLOCKS)
    return EngineConfig(
        num_gpu_blocks=max(1, blocks),
        max_num_seqs=em.max_num_seqs,
        max_num_batched_tokens=em.max_num_batched_tokens,
        block_size=em.block_size,
    )


class Pending:
    """The times of the dispatches on their way to an endpoint, a multiset: `first` (the
    earliest; inf when none), `pop` (the earliest), `remove` (one entry of a value, if there is
    one: O(log n), lazily: the entry is marked and leaves the heap when it reaches the top)."""

    __slots__ = ("count", "heap", "stale")

    def __init__(self) -> None:
        self.heap: list[float] = []  # the top is never a removed entry
        self.count: dict[float, int] = {}  # entries per value, removed ones not counted
        self.stale: dict[float, int] = {}  # removed entries per value, still in the heap

    def __bool__(self) -> bool:
        return bool(self.heap)

    def first(self) -> float:
        return self.heap[0] if self.heap else math.inf

    def push(self, t: float) -> None:
        heapq.heappush(self.heap, t)
        self.count[t] = self.count.get(t, 0) + 1

    def pop(self) -> float:
        t = heapq.heappop(self.heap)
        self._uncount(t)
        self._trim()
        return t

    def remove(self, t: float) -> bool:
        if t not in self.count:
            return False
        self._uncount(t)
        self.stale[t] = self.stale.get(t, 0) + 1
        self._trim()
        return True

    def clear(self) -> None:
        self.heap.clear()
        self.count.clear()
        self.stale.clear()

    def _uncount(self, t: float) -> None:
        n = self.count[t]
        if n == 1:
            del self.count[t]
        else:
            self.count[t] = n - 1

    def _trim(self) -> None:
        heap, stale = self.heap, self.stale
        while heap and (t := heap[0]) in stale:
            heapq.heappop(heap)
            n = stale[t]
            if n == 1:
                del stale[t]
            else:
                stale[t] = n - 1


@dataclass(slots=True)
class Published:
    """Engine gauges and counters as of the last step boundary (what ``/metrics`` shows)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_queries_total: int = 0
    prefix_hits_total: int = 0
    preemptions_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0


class SimEndpoint:
    """One endpoint of the simulated fleet: its engine, its in-flight step, its network delay.

    ``engine`` is None when no served model has a physics model that fits the hardware; the
    simulator then turns away whatever is placed there.
    """

    __slots__ = (
        "arrivals",
        "busy",
        "endpoint",
        "engine",
        "fault",
        "frontend",
        "index",
        "inflight",
        "network_rtt_s",
        "pending",
        "prefilling",
        "published",
        "rate_limit_rpm",
        "request_overhead_s",
        "retry_after_s",
        "roofline",
        "step_end",
        "step_handle",
        "step_out",
    )

    def __init__(self, endpoint: Endpoint, index: int) -> None:
        self.endpoint = endpoint
        self.index = index
        self.engine: Engine | None = None
        self.network_rtt_s = 0.0
        self.request_overhead_s = 0.0  # calibrated profiles: time before the engine sees it
        self.frontend = FrontEnd()  # calibrated profiles: the engine's serialised front end
        self.rate_limit_rpm: int | None = None
        self.roofline = roof = next(
            (r for m in endpoint.spec.models if (r := endpoint.roofline(m.name)) is not None),
            None,
        )
        if roof is not None:
            self.engine = self._new_engine(roof)
            emu, hw = endpoint.spec.emulation, roof.hardware
            rtt_ms = emu.network_rtt_ms  # as the emulator does
            self.network_rtt_s = rtt_ms / 1000.0 if rtt_ms is not None else hw.network_rtt_s
            provider = endpoint.substrate.kind == "provider-api"
            self.rate_limit_rpm = next(  # the emulator's quota, in the same order
                (
                    q
                    for q in (
                        emu.rate_limit_rpm,
                        endpoint.spec.limits.requests_per_min,
                        hw.rate_limit_rpm if provider else None,
                    )
                    if q is not None
                ),
                None,
            )
            self.request_overhead_s = roof.hardware.request_overhead_s
            self.frontend = FrontEnd(
                hw.frontend_request_s, hw.frontend_token_s, hw.frontend_handoff_s
            )
        self.busy = False
        self.step_out: StepOutput | None = None
        self.step_end = math.inf  # ``step_out.end_s`` while a step is in flight
        self.step_handle: asyncio.TimerHandle | None = None  # the in-flight step's completion
        self.pending = Pending()  # times of dispatches on their way here
        self.prefilling: list[RequestRecord] = []  # dispatched, first token not yet produced
        self.inflight: dict[int, RequestRecord] = {}  # dispatched here and not finished
        self.arrivals: deque[float] = deque()  # accepted requests in the last minute (rpm)
        self.fault: str | None = None  # "down", "hung" or "429" while a fault lasts
        self.retry_after_s = 1.0  # the Retry-After of a scheduled 429 fault
        self.published = Published()

    def _new_engine(self, roof: Roofline) -> Engine:
        """A fresh engine for this endpoint, with its hardware's idle-wake and after-stream
        terms (as the emulator's endpoint builds one)."""
        hw = roof.hardware
        return Engine(engine_config_for(self.endpoint, roof), roof, idle_wake_s=hw.idle_wake_s,
                      after_stream_s=hw.after_stream_s,
                      after_stream_factor=hw.after_stream_factor)

    def restart(self) -> None:
        """A fresh engine (empty KV cache, nothing running): after a crash or a hang."""
        if self.step_handle is not None:
            self.step_handle.cancel()
            self.step_handle = None
        if self.roofline is not None:
            self.engine = self._new_engine(self.roofline)
        self.busy, self.step_out, self.step_end = False, None, math.inf
        self.frontend.reset()
        self.pending.clear()
        self.prefilling.clear()
        self.inflight.clear()

    def over_rate_limit(self, now: float) -> float | None:
        """A provider's requests-per-minute limit: None when the request is accepted (and
        counted), else the seconds until a slot frees (its Retry-After)."""
        rpm = self.rate_limit_rpm
        if rpm is None:
            return None
        arrivals = self.arrivals
        while arrivals and arrivals[0] <= now - 60.0:
            arrivals.popleft()
        if len(arrivals) >= rpm:
            return arrivals[0] + 60.0 - now
        arrivals.append(now)
        return None

    @property
    def name(self) -> str:
        return self.endpoint.name

    def publish(self) -> None:
        """Record the engine's gauges now (called at step boundaries)."""
        e = self.engine
        if e is None:
            return
        p = self.published
        p.running, p.waiting, p.kv_usage = e.num_running, e.num_waiting, e.kv_usage
        p.prefix_queries_total, p.prefix_hits_total = e.prefix_queries_total, e.prefix_hits_total
        p.preemptions_total = e.num_preemptions_total
        p.prompt_tokens_total = e.prompt_tokens_total
        p.generation_tokens_total = e.generation_tokens_total

    def metrics(self) -> EngineMetrics | None:
        """What a scrape of ``/metrics`` returns: the last published gauges."""
        e = self.engine
        if e is None:
            return None
        p = self.published
        return EngineMetrics(
            running=p.running,
            waiting=p.waiting,
            kv_usage=p.kv_usage,
            prefix_queries_total=p.prefix_queries_total,
            prefix_hits_total=p.prefix_hits_total,
            block_size=e.config.block_size,
            num_gpu_blocks=e.config.num_gpu_blocks,
            preemptions_total=p.preemptions_total,
            prompt_tokens_total=p.prompt_tokens_total,
            generation_tokens_total=p.generation_tokens_total,
        )
