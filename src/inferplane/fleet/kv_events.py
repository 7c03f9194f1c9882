"""vLLM's KV-cache event format: the events an engine publishes as its prefix cache changes.

Routers that do KV-aware placement (llm-d, Dynamo, AIBrix, inferplane's own prefix index)
subscribe to a vLLM engine's ZMQ publisher and rebuild which block hashes each engine holds.
The emulated engine publishes the same bytes, so the same subscriber code works on both.

Wire format (``vllm/distributed/kv_events.py``)
-----------------------------------------------
Every batch of events is one msgpack value, encoded by msgspec from ``KVEventBatch``::

    [ts, [event, ...], data_parallel_rank]

``data_parallel_rank`` is a field with default ``None`` in an ``omit_defaults`` struct, so a
batch without a rank is the two-element ``[ts, [event, ...]]``; vLLM's ZMQ publisher always
fills in its rank (0 for a single engine), so live engines send three elements.

Events are msgspec structs with ``tag=True``. Two encodings exist:

``"array"`` (``array_like=True``; vLLM from PR #19737, which added ``medium``, until PR
#42892) — a positional array whose first element is the tag (the class name)::

    ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]
    ["BlockRemoved", block_hashes, medium]
    ["AllBlocksCleared"]

Field order checked against two revisions of that file: ``b4e69e0`` (before #19737: the
first five fields, no ``medium``, no rank) and ``0181ea3`` (after #42892: the same order,
then ``lora_name``, ``extra_keys``, ``group_idx``… — which positional decoders ignore).
The seven-element form above is what vLLM v0.10–v0.11 sent.

``"map"`` (vLLM after PR #42892) — a map with the tag under ``"type"`` and fields by name::

    {"type": "BlockStored", "block_hashes": [...], "parent_block_hash": ..., ...}

:func:`encode_event_batch` writes either; :func:`decode_event_batch` reads both, and ignores
fields it does not know.

ZMQ framing (``ZmqEventPublisher``)
-----------------------------------
A PUB socket (default ``tcp://*:5557``, port offset by the data-parallel rank) sends each
batch as a three-frame multipart message::

    [topic (utf-8 bytes, default b""), seq (8-byte big-endian unsigned), payload (msgpack)]

``seq`` counts batches from 0. An optional ROUTER socket serves replays: a client sends
``[b"", start_seq (8-byte big-endian)]`` and receives ``[b"", seq, payload]`` for every
buffered batch with ``seq >= start_seq``, then the end marker ``[b"", (-1 as 8-byte signed
big-endian), b""]``. :func:`seq_frame` builds the ``seq`` frame.

Block hashes are unsigned 64-bit integers here (vLLM's ``ExternalBlockHash`` is ``int`` or
``bytes``; integer hashes are what subscribers index by).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

MEDIUM_GPU = "GPU"

Wire = Literal["array", "map"]


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Consecutive full blocks were computed and entered the prefix cache.

    ``parent_block_hash`` is the hash of the block before ``block_hashes[0]`` in the chain,
    ``None`` when the first block starts the sequence. ``token_ids`` holds the tokens of all
    the blocks, ``block_size`` per block.
    """

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM_GPU


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Cached blocks were evicted (their memory reused for other tokens)."""

    block_hashes: list[int]
    medium: str | None = MEDIUM_GPU


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The whole prefix cache was reset."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


def seq_frame(seq: int) -> bytes:
    """The second ZMQ frame of a published batch: ``seq`` as 8 big-endian bytes."""
    return seq.to_bytes(8, "big")


def _event_to_wire(event: KVEvent, wire: Wire) -> Any:
    if isinstance(event, BlockStored):
        if wire == "array":
            return [
                "BlockStored",
                event.block_hashes,
                event.parent_block_hash,
                event.token_ids,
                event.block_size,
                event.lora_id,
                event.medium,
            ]
        return {
            "type": "BlockStored",
            "block_hashes": event.block_hashes,
            "parent_block_hash": event.parent_block_hash,
            "token_ids": event.token_ids,
            "block_size": event.block_size,
            "lora_id": event.lora_id,
            "medium": event.medium,
        }
    if isinstance(event, BlockRemoved):
        if wire == "array":
            return ["BlockRemoved", event.block_hashes, event.medium]
        return {"type": "BlockRemoved", "block_hashes": event.block_hashes, "medium": event.medium}
    return ["AllBlocksCleared"] if wire == "array" else {"type": "AllBlocksCleared"}


def encode_event_batch(
    ts: float, events: Sequence[KVEvent], dp_rank: int | None = None, wire: Wire = "array"
) -> bytes:
    """Encode one ``KVEventBatch`` payload (the third ZMQ frame) exactly as vLLM does.

    ``dp_rank=None`` drops the trailing rank element (msgspec's ``omit_defaults``).
    """
    batch: list[Any] = [float(ts), [_event_to_wire(e, wire) for e in events]]
    if dp_rank is not None:
        batch.append(dp_rank)
    out: bytes = msgpack.packb(batch, use_bin_type=True)
    return out


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _event_from_wire(raw: Any) -> KVEvent:
    if isinstance(raw, dict):
        tag = raw.get("type")
        if tag == "BlockStored":
            return BlockStored(
                block_hashes=[int(h) for h in raw["block_hashes"]],
                parent_block_hash=_opt_int(raw.get("parent_block_hash")),
                token_ids=[int(t) for t in raw["token_ids"]],
                block_size=int(raw["block_size"]),
                lora_id=_opt_int(raw.get("lora_id")),
                medium=raw.get("medium"),
            )
        if tag == "BlockRemoved":
            return BlockRemoved([int(h) for h in raw["block_hashes"]], raw.get("medium"))
        if tag == "AllBlocksCleared":
            return AllBlocksCleared()
        raise ValueError(f"unknown KV event tag {tag!r}")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"malformed KV event {raw!r}")
    tag = raw[0]
    if tag == "BlockStored":
        return BlockStored(
            block_hashes=[int(h) for h in raw[1]],
            parent_block_hash=_opt_int(raw[2]),
            token_ids=[int(t) for t in raw[3]],
            block_size=int(raw[4]),
            lora_id=_opt_int(raw[5]) if len(raw) > 5 else None,
            medium=raw[6] if len(raw) > 6 else None,
        )
    if tag == "BlockRemoved":
        return BlockRemoved([int(h) for h in raw[1]], raw[2] if len(raw) > 2 else None)
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    raise ValueError(f"unknown KV event tag {tag!r}")


def decode_event_batch(payload: bytes) -> tuple[float, list[KVEvent], int | None]:
    """Decode a ``KVEventBatch`` payload (array or map events) to ``(ts, events, dp_rank)``."""
    raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    if isinstance(raw, dict):  # an all-map encoding of the outer batch, for robustness
        ts, events, rank = raw["ts"], raw["events"], raw.get("data_parallel_rank")
    elif isinstance(raw, list) and len(raw) in (2, 3):
        ts, events = raw[0], raw[1]
        rank = raw[2] if len(raw) == 3 else None
    else:
        raise ValueError("malformed KVEventBatch")
    return float(ts), [_event_from_wire(e) for e in events], _opt_int(rank)
