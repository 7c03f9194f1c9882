"""A request inside the emulated engine, its deterministic output, and what a step returns.

Split from :mod:`inferplane.twin.engine.model` (which re-exports every name here); see that module
for the scheduling behaviour.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from inferplane.tokenization import VOCABULARY, word_id

_OUTPUT_WORDS: tuple[str, ...] = VOCABULARY
_OUTPUT_IDS: tuple[int, ...] = tuple(word_id(w) for w in VOCABULARY)


class RequestStatus(StrEnum):
    """Lifecycle of an :class:`EngineRequest`."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, to be recomputed
    FINISHED = "finished"
    ABORTED = "aborted"


def _output_index(seed: int, index: int) -> int:
    return ((seed * 1_000_003) ^ (index * 2_654_435_761)) % len(_OUTPUT_IDS)


def output_token_id(seed: int, index: int) -> int:
    """The id of output token ``index`` of the request with ``seed`` (its ``seed`` field).

    Output tokens are words of :data:`inferplane.tokenization.VOCABULARY` with their
    :func:`~inferplane.tokenization.word_id`, so the text :func:`output_word` gives
    re-tokenizes to the same ids and a follow-up turn hits the cache.
    """
    return _OUTPUT_IDS[_output_index(seed, index)]


def output_word(seed: int, index: int) -> str:
    """The text (one word) of output token ``index`` of the request with ``seed``."""
    return _OUTPUT_WORDS[_output_index(seed, index)]


@dataclass(eq=False, slots=True)
class EngineRequest:
    """One request and its progress inside the engine.

    ``prompt_token_ids`` may be any sequence (a ``range`` or ``array`` keeps long prompts
    compact). ``prompt_block_hashes``, when given, are the chained hashes of the prompt's
    full blocks and replace hashing the tokens (a trace replay knows prefixes only by hash);
    the tokens are then read only for KV events and the block that straddles prompt and
    output. ``num_cached_tokens`` is -1 until first scheduled, then the prompt tokens served
    from the prefix cache. ``cache_salt`` (vLLM's per-request field) seeds the hash chain: two
    salts never share a cached block (`tokenization.salt_root`); given hashes are unsalted.
    """

    request_id: str
    prompt_token_ids: Sequence[int]
    max_tokens: int
    arrival_time: float = 0.0
    prompt_block_hashes: Sequence[int] | None = None
    cache_salt: str | None = None
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1
    num_output_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    prompt_len: int = field(init=False)
    seed: int = field(init=False)
    block_ids: list[int] = field(init=False, repr=False)
    num_cached_blocks: int = field(init=False, repr=False)  # leading blocks already named
    hashes: list[int] = field(init=False, repr=False)  # known full-block hash chain

    def __post_init__(self) -> None:
        self.prompt_len = len(self.prompt_token_ids)
        self.seed = zlib.crc32(self.request_id.encode())
        self.block_ids = []
        self.num_cached_blocks = 0
        self.hashes = []

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens so far."""
        return self.prompt_len + self.num_output_tokens

    def output_token_ids(self) -> list[int]:
        """The output tokens produced so far."""
        return [output_token_id(self.seed, i) for i in range(self.num_output_tokens)]

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output."""
        p = self.prompt_len
        out = list(self.prompt_token_ids[start : min(end, p)]) if start < p else []
        if end > p:  # output_token_id inlined: hashing decode blocks is a hot path
            seed, ids, size = self.seed * 1_000_003, _OUTPUT_IDS, len(_OUTPUT_IDS)
            span = range(max(start - p, 0), end - p)
            out += [ids[(seed ^ (i * 2_654_435_761)) % size] for i in span]
        return out


class LatencySample(NamedTuple):
    """``n`` observations of ``seconds`` for histogram ``kind``.

    Kinds: ``ttft`` (arrival → first token), ``itl`` (between tokens), ``e2e`` (arrival →
    last token), ``queue`` (arrival → first scheduled). Equal observations of one step are
    grouped so that decode batches cost O(1) samples.
    """

    kind: str
    seconds: float
    n: int = 1


@dataclass(slots=True)
class StepOutput:
    """What one step (or one fast-forwarded run of ``num_steps`` decode steps) produced."""

    start_s: float
    duration_s: float
    new_tokens: dict[str, int] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    num_steps: int = 1
    step_durations: list[float] = field(default_factory=list)
    prefill_tokens: int = 0
    decode_seqs: int = 0

    @property
    def end_s(self) -> float:
        """Timestamp of the tokens of the (last) step."""
        return self.start_s + self.duration_s
