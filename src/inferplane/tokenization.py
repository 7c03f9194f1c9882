"""The engines' token space, shared by the emulator, the simulator and the gateway.

A real model's tokenizer (`load_tokenizer`, the ``tokenizer`` of a served model in the fleet
file) replaces the word rule in the gateway when it is configured.

The project's deterministic tokenization: one whitespace-separated word is one token, and a word's
token id is 31 bits of its BLAKE2b digest (stable across processes). Full KV blocks of token ids
are identified by a hash chain, as vLLM's prefix cache does. The emulated engine uses these to
cache and to publish KV events; the gateway uses the same functions to compute a request's engine
block hashes, so the precise prefix index (fed by KV events) can be matched against a prompt.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from functools import lru_cache
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# 256 distinct short, common words: one byte of the BLAKE2b stream picks one word.
_WORDS = """
    the of and to in is it that was for on are as with his they at be this from have or by one
    had not but what all were when we there can an your which their said if do will each about
    how up out them then she many some so these would other into has more her two like him see
    time could no make than first been its who now people my made over did down only way find
    use may water long little very after words called just where most know get through back
    much before go good new write our used me man too any day same right look think also around
    another came come work three word must because does part even place well such here take why
    things help put years different away again off went old number great tell men say small
    every found still between name should home big give air line set own under read last never
    us left end along while might next sound below saw something thought both few those always
    looked show large often together asked house world going want school important until form
    food keep children feet land side without boy once animals life enough took sometimes four
    head above kind began almost live page got earth need far hand high year mother light
    parts country father let night following picture being study second eyes soon times story
    boys since white days ever paper hard near sentence better best across during
"""
VOCABULARY: tuple[str, ...] = tuple(_WORDS.split())
if len(VOCABULARY) != 256 or len(set(VOCABULARY)) != 256:  # pragma: no cover - import-time guard
    raise RuntimeError(f"VOCABULARY must hold 256 distinct words, has {len(set(VOCABULARY))}")

@lru_cache(maxsize=1 << 16)
def word_id(word: str) -> int:
    """Return the stable token id of ``word``: 31 bits of its BLAKE2b digest."""
    digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


_VOCAB_IDS: dict[str, int] = {w: word_id(w) for w in VOCABULARY}
if len(set(_VOCAB_IDS.values())) != len(VOCABULARY):  # pragma: no cover - import-time guard
    raise RuntimeError("two VOCABULARY words share a token id")


def token_ids(text: str) -> list[int]:
    """Map each word of ``text`` to its stable token id (see :func:`word_id`)."""
    words = text.split()
    # C-speed lookup for vocabulary words; -1 (never a real id) marks the others.
    out = list(map(_VOCAB_IDS.get, words, repeat(-1)))
    if -1 in out:
        return [word_id(w) if i == -1 else i for w, i in zip(words, out, strict=True)]
    return out


ROOT_HASH_SEED = 0x1F2E3D4C5B6A7988
"""The parent of the first block of every sequence."""

_MASK64 = (1 << 64) - 1


def hash_block_tokens(parent: int | None, tokens: Sequence[int]) -> int:
    """The unsigned 64-bit hash of one full block, chained to ``parent`` (None = root)."""
    return hash((ROOT_HASH_SEED if parent is None else parent, tuple(tokens))) & _MASK64


@lru_cache(maxsize=4096)
def salt_root(cache_salt: str | None) -> int | None:
    """The parent of a salted sequence's first block (None, the root, without a salt): two
    salts never share a block hash, as in vLLM, which mixes ``cache_salt`` into the first block."""
    if not cache_salt:
        return None
    return int.from_bytes(hashlib.blake2b(cache_salt.encode(), digest_size=8).digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids`` (a trailing partial block is skipped)."""
    # `hash_block_tokens` inlined (one call a block is a third of the cost): the same hashes
    ids = tuple(token_ids)
    h = ROOT_HASH_SEED if parent is None else parent
    out: list[int] = []
    for start in range(0, len(ids) - block_size + 1, block_size):
        h = hash((h, ids[start : start + block_size])) & _MASK64
        out.append(h)
    return out


def engine_block_hashes(text: str, block_size: int, parent: int | None = None) -> list[int]:
    """The engine block hashes of a prompt text under the deterministic tokenization (chained
    to ``parent``: a `salt_root` for a salted request)."""
    return block_hashes(token_ids(text), block_size, parent)


@lru_cache(maxsize=32)
def load_tokenizer(path: str) -> Tokenizer:
    """A Hugging Face ``tokenizer.json`` (``path`` is the file, or a folder holding one), loaded
    once per path. Raises ``ValueError`` with a readable reason."""
    from tokenizers import Tokenizer

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ValueError(f"no tokenizer file at {str(p)!r}")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:  # the Rust side raises a plain Exception for bad files
        raise ValueError(f"cannot load tokenizer {str(p)!r}: {exc}") from None


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a text prompt as an OpenAI-compatible engine computes them for
    ``/v1/completions`` (special tokens added as the tokenizer's post-processor says, as vLLM's
    ``add_special_tokens=True`` does).

    Where the tokenizers library's rayon pool is off (``TOKENIZERS_PARALLELISM`` set to one of
    its "off" values; `inferplane.cli` sets ``false`` unless the environment has the variable)
    the ids come from ``encode_batch_fast``, which skips the character offsets ``encode``
    computes and nothing here reads: 179 against 335 µs a prompt over the 149 prompts of the
    real-engine bench's first 60 s (docs/benchmarks.md, "The gateway's burst on real engines").
    It releases the GIL while it runs, so another thread (the ledger's writer, the OTLP exporter)
    may hold it when the loop wants it back. With the pool on, a batch would hand even one
    prompt to a pool thread and wait for it, so ``encode`` is used."""
    fast = getattr(tokenizer, "encode_batch_fast", None)  # tokenizers >= 0.20
    setting = os.environ.get("TOKENIZERS_PARALLELISM")
    if fast is not None and setting is not None and setting.lower() in POOL_OFF:
        batch: list[int] = fast([text], add_special_tokens=True)[0].ids
        return batch
    ids: list[int] = tokenizer.encode(text, add_special_tokens=True).ids
    return ids


POOL_OFF = frozenset({"", "off", "false", "f", "no", "n", "0"})
"""The values of ``TOKENIZERS_PARALLELISM`` for which the tokenizers library keeps to the
calling thread (its own list); unset means on."""
