"""Deterministic prompt text and the project's word tokenization.

inferplane's emulated engines and the simulator tokenize text the documented, boring way:
**one whitespace-separated word is one token**. This module turns trace block ids (Mooncake's
``hash_ids``, one per 512-token block of a prompt) into text that follows that rule, so that

* two requests that share a leading run of block ids share a text prefix (and therefore a token
  prefix, and therefore a prefix-cache hit in an emulated or a real engine), and
* a prompt built for ``input_length`` tokens is exactly ``input_length`` words.

The text of a block is a fixed run of words drawn from :data:`VOCABULARY` (short, common English
words, so a real BPE tokenizer also spends roughly one token on each) by a keyed BLAKE2b stream of
the block id. Nothing depends on Python's randomized ``hash()``: the same id gives the same text in
every process, on every machine.

For small real engines, ``block_tokens=32`` scales every 512-token trace block down to 32 words
(and the prompt length by 32/512, rounded up), keeping the sharing structure of the trace.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache

from inferplane.tokenization import VOCABULARY, token_ids, word_id

__all__ = [
    "TRACE_BLOCK_TOKENS",
    "VOCABULARY",
    "block_text",
    "count_tokens",
    "prompt_from_blocks",
    "scaled_length",
    "token_ids",
    "unique_prompt",
    "word_id",
]

TRACE_BLOCK_TOKENS = 512
"""Tokens per block id in the Mooncake trace."""

_DIGEST_BYTES = 64  # BLAKE2b's largest digest: 64 words per hash call


def count_tokens(text: str) -> int:
    """Return the number of tokens in ``text``: its whitespace-separated words."""
    return len(text.split())


def scaled_length(input_length: int, block_tokens: int = TRACE_BLOCK_TOKENS) -> int:
    """Scale a trace prompt length to blocks of ``block_tokens`` tokens (rounded up).

    Rounding up keeps the number of blocks unchanged: ``ceil(scaled / block_tokens)`` equals
    ``ceil(input_length / 512)`` for every length.
    """
    if block_tokens == TRACE_BLOCK_TOKENS:
        return input_length
    return -(-input_length * block_tokens // TRACE_BLOCK_TOKENS)


@lru_cache(maxsize=8192)
def _words(namespace: str, block_id: int, n_tokens: int, vocabulary: tuple[str, ...]) -> str:
    """Return the first ``n_tokens`` words of the stream for ``(namespace, block_id)``."""
    size = len(vocabulary)
    out: list[str] = []
    chunk = 0
    while len(out) < n_tokens:
        digest = hashlib.blake2b(
            f"{namespace}:{block_id}:{chunk}".encode(), digest_size=_DIGEST_BYTES
        ).digest()
        if size == 256:
            out.extend([vocabulary[b] for b in digest])
        else:
            out.extend([vocabulary[b % size] for b in digest])
        chunk += 1
    del out[n_tokens:]
    return " ".join(out)


def block_text(
    block_id: int,
    n_tokens: int = TRACE_BLOCK_TOKENS,
    seed_words: Sequence[str] = VOCABULARY,
) -> str:
    """Return the fixed text of one block: ``n_tokens`` words derived from ``block_id``.

    The words are a prefix-stable stream: ``block_text(b, k)`` is the first ``k`` words of
    ``block_text(b, n)`` for any ``n >= k``, so a partial last block is a prefix of the full one.
    ``seed_words`` is the vocabulary the words are drawn from (default :data:`VOCABULARY`); every
    word must be non-empty and contain no whitespace. Results are cached per block.
    """
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    if n_tokens == 0:
        return ""
    vocabulary = seed_words if isinstance(seed_words, tuple) else tuple(seed_words)
    if not vocabulary:
        raise ValueError("seed_words must not be empty")
    return _words("b", block_id, n_tokens, vocabulary)


def _assemble(
    namespace: str, block_ids: Sequence[int], total: int, block_tokens: int, pad_key: int
) -> str:
    """Join whole blocks and one trimmed last block into exactly ``total`` words."""
    if total < 0:
        raise ValueError(f"input_length must be >= 0, got {total}")
    if block_tokens <= 0:
        raise ValueError(f"block_tokens must be > 0, got {block_tokens}")
    full, rest = divmod(total, block_tokens)
    parts: list[str] = []
    for i in range(full):
        if i < len(block_ids):
            parts.append(_words(namespace, block_ids[i], block_tokens, VOCABULARY))
        else:  # more tokens than the ids cover: deterministic pad blocks keyed by the last id
            parts.append(_words(f"pad{pad_key}", i, block_tokens, VOCABULARY))
    if rest:
        if full < len(block_ids):
            # The stream is prefix-stable, so this is the first ``rest`` words of the full block.
            parts.append(_words(namespace, block_ids[full], rest, VOCABULARY))
        else:
            parts.append(_words(f"pad{pad_key}", full, rest, VOCABULARY))
    return " ".join(parts)


def prompt_from_blocks(
    hash_ids: Sequence[int], input_length: int, block_tokens: int = TRACE_BLOCK_TOKENS
) -> str:
    """Build the prompt text of a trace request from its block ids.

    Each id becomes ``block_tokens`` words (:func:`block_text`); the last block is trimmed so the
    prompt is exactly ``scaled_length(input_length, block_tokens)`` tokens -- ``input_length``
    itself at the default 512. Requests whose ids share a leading run share that text prefix.
    If the ids cover fewer tokens than needed, deterministic pad blocks (keyed by the last id)
    fill the rest; extra ids are ignored.
    """
    total = scaled_length(input_length, block_tokens)
    pad_key = hash_ids[-1] if hash_ids else -1
    return _assemble("b", hash_ids, total, block_tokens, pad_key)


def unique_prompt(key: int, input_length: int, block_tokens: int = TRACE_BLOCK_TOKENS) -> str:
    """Build a prompt of ``input_length`` (scaled) tokens that shares no block with any other key.

    For traces without prefix information (Azure): pass the request's index as ``key``. The text
    comes from a namespace of its own, so it never collides with :func:`prompt_from_blocks`.
    """
    total = scaled_length(input_length, block_tokens)
    n_blocks = -(-total // block_tokens)
    return _assemble(f"u{key}", range(n_blocks), total, block_tokens, key)
