"""Prompt block hashes: a hash chain over fixed-size blocks of the prompt text, seeded by model.

As in the Gateway API Inference Extension's prefix plugin, two prompts that share a leading run of
whole blocks share their leading hashes, so an index of the blocks each endpoint has seen predicts
prefix-cache hits. Hashes are 64-bit blake2b digests, stable across processes and replicas.
"""

from __future__ import annotations

from hashlib import blake2b


def prompt_block_hashes(
    model: str, text: str, block_chars: int = 256, max_blocks: int = 512, salt: str = ""
) -> tuple[int, ...]:
    """Hash chain ``h_i = H(h_{i-1} || block_i)`` over whole blocks; ``h_{-1} = H(model)``, or
    ``H(model || 0 || salt)`` with a cache salt (`placement.isolation`: one tenant's prefixes never
    match another's). Only full blocks are hashed; at most ``max_blocks`` (the prompt's head)."""
    data = text.encode("utf-8", "surrogatepass")
    n = min(len(data) // block_chars, max_blocks)
    seed = f"{model}\0{salt}" if salt else model
    prev = blake2b(seed.encode(), digest_size=8).digest()
    out: list[int] = []
    for i in range(n):
        prev = blake2b(prev + data[i * block_chars : (i + 1) * block_chars], digest_size=8).digest()
        out.append(int.from_bytes(prev, "little"))
    return tuple(out)
