"""The replayed workload: a slice of a trace turned into timed, pre-encoded HTTP requests.

A trace request (arrival in trace seconds, input/output lengths, 512-token block ids) becomes a
:class:`Planned` request at ``arrival_s`` *real* seconds after the replay starts:
``slice_trace`` re-bases the window and divides by ``rate_scale`` (engine seconds), and the
emulator's ``time_scale`` divides once more (engine time runs ``time_scale`` × faster than real
time). Requests that cannot fit the model's context window (``input + output > max_context``)
are left out, as a router could only answer them with an error.

The prompt is :func:`~inferplane.twin.traces.tokens.prompt_from_blocks` text (one word = one
token of the emulated engine, shared block ids share a text prefix). It is sent in one of three
forms (:data:`FORMS`), chosen per router so its cache-aware policy can read it:

* ``chat-text`` -- ``POST /v1/chat/completions``, one user message with the text;
* ``completion-text`` -- ``POST /v1/completions``, ``prompt`` = the text;
* ``completion-ids`` -- ``POST /v1/completions``, ``prompt`` = ``token_ids(text)``.

Every body streams with ``stream_options.include_usage`` and asks for the trace's output length.
Bodies are encoded once per form (:func:`encode_bodies`) so that every router of the run sends
byte-identical requests and the client spends no time building them during the replay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from inferplane.twin.traces.loader import TraceRequest, slice_trace
from inferplane.twin.traces.tokens import (
    TRACE_BLOCK_TOKENS,
    VOCABULARY,
    prompt_from_blocks,
    token_ids,
)

_TINY_IDS = {w: 4 + i for i, w in enumerate(VOCABULARY)}

Form = Literal["chat-text", "completion-text", "completion-ids"]
FORMS: tuple[Form, ...] = ("chat-text", "completion-text", "completion-ids")
PATHS: dict[Form, str] = {
    "chat-text": "/v1/chat/completions",
    "completion-text": "/v1/completions",
    "completion-ids": "/v1/completions",
}


@dataclass(frozen=True, slots=True)
class Planned:
    """One request of the replay: when to send it (real seconds) and what it asks for."""

    index: int
    arrival_s: float
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SliceSpec:
    """Which part of the trace is replayed and how fast."""

    start_s: float = 0.0
    duration_s: float = 300.0
    rate_scale: float = 1.0
    time_scale: float = 1.0
    max_context: int = 32768
    max_output: int | None = None
    limit: int | None = None


def plan(trace: Sequence[TraceRequest], spec: SliceSpec) -> tuple[list[Planned], int]:
    """The requests of ``spec``'s window in real time, and how many were left out (too long)."""
    if spec.time_scale <= 0:
        raise ValueError(f"time_scale must be > 0, got {spec.time_scale}")
    window = slice_trace(trace, spec.start_s, spec.duration_s, spec.rate_scale, spec.limit)
    out: list[Planned] = []
    skipped = 0
    for r in window:
        n_out = r.output_tokens
        if spec.max_output is not None:
            n_out = min(n_out, spec.max_output)
        n_out = max(1, n_out)
        if r.input_tokens + n_out > spec.max_context or r.input_tokens == 0:
            skipped += 1
            continue
        out.append(
            Planned(len(out), r.arrival_s / spec.time_scale, r.input_tokens, n_out, r.hash_ids)
        )
    return out, skipped


def prompt_text(p: Planned, block_tokens: int = TRACE_BLOCK_TOKENS) -> str:
    return prompt_from_blocks(p.hash_ids, p.input_tokens, block_tokens)


def body(
    p: Planned, form: Form, model: str, block_tokens: int = TRACE_BLOCK_TOKENS,
    ids: Callable[[str], list[int]] = token_ids,
) -> dict[str, Any]:
    """The JSON body of ``p`` in ``form``; ``ids`` tokenizes ``completion-ids`` prompts (the
    emulator's ids by default; :func:`tiny_llama_ids` for the real tiny-llama engines)."""
    text = prompt_text(p, block_tokens)
    out: dict[str, Any] = {
        "model": model,
        "max_tokens": p.output_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
    }
    if form == "chat-text":
        out["messages"] = [{"role": "user", "content": text}]
    elif form == "completion-text":
        out["prompt"] = text
    elif form == "completion-ids":
        out["prompt"] = ids(text)
    else:  # pragma: no cover - Literal guards the callers
        raise ValueError(f"unknown prompt form {form!r}")
    return out


def encode_bodies(
    planned: Sequence[Planned], form: Form, model: str, block_tokens: int = TRACE_BLOCK_TOKENS,
    ids: Callable[[str], list[int]] = token_ids,
) -> list[bytes]:
    """Every request's body in ``form``, JSON-encoded once."""
    return [orjson.dumps(body(p, form, model, block_tokens, ids)) for p in planned]


def tiny_llama_ids(text: str) -> list[int]:
    """Token ids of the real ``tiny-llama`` tokenizer (``scripts/fidelity/build_tiny_model.py``:
    ids 0-3 specials, then the 256 vocabulary words in order) for vocabulary-word text."""
    return [_TINY_IDS[w] for w in text.split()]


def offered_load(planned: Sequence[Planned]) -> dict[str, float]:
    """Request rate and token rates the slice offers, in real time (for the report)."""
    if not planned:
        return {"requests": 0, "span_s": 0.0, "req_per_s": 0.0, "in_tok_per_s": 0.0,
                "out_tok_per_s": 0.0}
    span = max(planned[-1].arrival_s, 1e-9)
    return {
        "requests": len(planned),
        "span_s": span,
        "req_per_s": len(planned) / span,
        "in_tok_per_s": sum(p.input_tokens for p in planned) / span,
        "out_tok_per_s": sum(p.output_tokens for p in planned) / span,
    }
