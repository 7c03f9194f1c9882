"""Paged KV blocks, the prefix cache and vLLM's KV event wire format."""

from __future__ import annotations

import os
import subprocess
import sys

import msgpack
import pytest

from inferplane.fleet.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    decode_event_batch,
    encode_event_batch,
    seq_frame,
)
from inferplane.tokenization import block_hashes, hash_block_tokens
from inferplane.twin.engine.kv_cache import BlockPool


def _pool(num_blocks: int = 8) -> tuple[BlockPool, list[KVEvent]]:
    events: list[KVEvent] = []
    return BlockPool(num_blocks, block_size=4, on_event=events.append), events


# -- hashing -----------------------------------------------------------------------------------
def test_block_hashes_cover_full_blocks_only_and_chain() -> None:
    toks = list(range(10))
    hs = block_hashes(toks, 4)
    assert len(hs) == 2
    assert hs[0] == hash_block_tokens(None, toks[0:4])
    assert hs[1] == hash_block_tokens(hs[0], toks[4:8])
    # The same block after a different prefix has a different hash.
    assert block_hashes([9, 9, 9, 9, *toks[4:8]], 4)[1] != hs[1]
    assert all(0 <= h < 1 << 64 for h in hs)


def test_hashes_are_equal_across_processes_with_different_hash_seeds() -> None:
    code = "from inferplane.tokenization import block_hashes; print(block_hashes(range(64), 16))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True, text=True, check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert outs == {f"{block_hashes(range(64), 16)}\n"}


# -- prefix cache ------------------------------------------------------------------------------
def test_lookup_returns_longest_cached_prefix() -> None:
    pool, _ = _pool()
    hs = block_hashes(list(range(12)), 4)
    blocks = pool.allocate(3)
    pool.cache_blocks(blocks[:2], hs[:2], None)
    assert pool.get_computed_blocks(hs) == 2
    assert pool.get_computed_blocks([hs[0], 12345, hs[1]]) == 1  # stops at the first miss
    assert pool.lookup(hs) == blocks[:2]


def test_free_blocks_stay_cached_and_are_evicted_in_lru_order() -> None:
    pool, events = _pool(num_blocks=6)
    a = pool.allocate(3)  # blocks 0, 1, 2
    hs = block_hashes(list(range(12)), 4)
    pool.cache_blocks(a, hs, None, lambda: list(range(12)))
    pool.free(reversed(a))  # tail first, as a finished sequence does
    assert pool.usage == 0.0
    assert pool.get_computed_blocks(hs) == 3  # free but still cached
    # Never-used blocks first, then the freed sequence tail first.
    assert pool.free_block_order() == [3, 4, 5, 2, 1, 0]
    assert pool.allocate(4) == [3, 4, 5, 2]
    assert events[-1] == BlockRemoved([hs[2]])
    assert pool.get_computed_blocks(hs) == 2  # the prefix survives its evicted tail


def test_touch_takes_a_cached_free_block_out_of_the_free_queue() -> None:
    pool, _ = _pool(num_blocks=4)
    a = pool.allocate(2)
    pool.cache_blocks(a, block_hashes(list(range(8)), 4), None)
    pool.free(reversed(a))
    pool.touch(a[:1])
    assert pool.ref_count(a[0]) == 1
    assert a[0] not in pool.free_block_order()
    assert pool.usage == 0.25


def test_refcount_keeps_shared_blocks_alive() -> None:
    pool, _ = _pool(num_blocks=4)
    hs = block_hashes(list(range(8)), 4)
    a = pool.allocate(2)
    pool.cache_blocks(a, hs, None)
    hits = pool.lookup(hs)
    pool.touch(hits)  # a second sequence shares both blocks
    assert [pool.ref_count(b) for b in a] == [2, 2]
    pool.free(reversed(a))  # the first sequence finishes
    assert [pool.ref_count(b) for b in a] == [1, 1]
    assert pool.usage == 0.5
    assert pool.allocate(2) == [2, 3]  # shared blocks are not evictable
    assert pool.get_computed_blocks(hs) == 2
    with pytest.raises(MemoryError):
        pool.allocate(1)


def test_duplicate_hash_keeps_one_cached_copy() -> None:
    pool, events = _pool()
    hs = block_hashes(list(range(4)), 4)
    a, b = pool.allocate(1), pool.allocate(1)
    pool.cache_blocks(a, hs, None)
    pool.cache_blocks(b, hs, None)
    assert pool.num_cached_blocks == 1
    assert sum(isinstance(e, BlockStored) for e in events) == 1


def test_free_more_than_allocated_is_an_error() -> None:
    pool, _ = _pool()
    b = pool.allocate(1)
    pool.free(b)
    with pytest.raises(ValueError):
        pool.free(b)


def test_prefix_counters_count_tokens() -> None:
    pool, _ = _pool()
    pool.record_prefix_query(40, 32)
    pool.record_prefix_query(10, 0)
    assert (pool.prefix_queries_tokens, pool.prefix_hits_tokens) == (50, 32)


def test_disabled_prefix_caching_names_nothing() -> None:
    events: list[KVEvent] = []
    pool = BlockPool(4, 4, enable_prefix_caching=False, on_event=events.append)
    hs = block_hashes(list(range(8)), 4)
    pool.cache_blocks(pool.allocate(2), hs, None)
    assert pool.get_computed_blocks(hs) == 0
    assert events == []


# -- events ------------------------------------------------------------------------------------
def test_block_stored_carries_the_parent_chain() -> None:
    pool, events = _pool()
    toks = list(range(16))
    hs = block_hashes(toks, 4)
    blocks = pool.allocate(4)
    pool.cache_blocks(blocks[:2], hs[:2], None, lambda: toks[:8])
    pool.cache_blocks(blocks[2:], hs[2:], hs[1], lambda: toks[8:])
    assert events == [
        BlockStored(hs[:2], None, toks[:8], 4),
        BlockStored(hs[2:], hs[1], toks[8:], 4),
    ]


def test_reset_prefix_cache_refuses_while_in_use_then_clears() -> None:
    pool, events = _pool()
    hs = block_hashes(list(range(8)), 4)
    a = pool.allocate(2)
    pool.cache_blocks(a, hs, None)
    assert pool.reset_prefix_cache() is False
    pool.free(reversed(a))
    assert pool.reset_prefix_cache() is True
    assert events[-1] == AllBlocksCleared()
    assert pool.get_computed_blocks(hs) == 0
    pool.allocate(8)  # evicting un-named blocks emits nothing
    assert isinstance(events[-1], AllBlocksCleared)


_EVENTS: list[KVEvent] = [
    BlockStored([1, 2**64 - 1], None, list(range(8)), 4),
    BlockStored([3], 2**64 - 1, [7, 7, 7, 7], 4, lora_id=5, medium=None),
    BlockRemoved([1, 3]),
    AllBlocksCleared(),
]


@pytest.mark.parametrize("wire", ["array", "map"])
@pytest.mark.parametrize("dp_rank", [None, 0, 3])
def test_event_batch_round_trip(wire: str, dp_rank: int | None) -> None:
    payload = encode_event_batch(12.5, _EVENTS, dp_rank, wire=wire)  # type: ignore[arg-type]
    assert decode_event_batch(payload) == (12.5, _EVENTS, dp_rank)


def test_array_wire_layout_matches_vllm_msgspec_structs() -> None:
    raw = msgpack.unpackb(encode_event_batch(1.0, _EVENTS, 0))
    assert raw == [
        1.0,
        [
            ["BlockStored", [1, 2**64 - 1], None, list(range(8)), 4, None, "GPU"],
            ["BlockStored", [3], 2**64 - 1, [7, 7, 7, 7], 4, 5, None],
            ["BlockRemoved", [1, 3], "GPU"],
            ["AllBlocksCleared"],
        ],
        0,
    ]
    assert len(msgpack.unpackb(encode_event_batch(1.0, [], None))) == 2  # omit_defaults


def test_map_wire_layout_and_unknown_fields_are_ignored() -> None:
    raw = msgpack.unpackb(encode_event_batch(1.0, _EVENTS[2:3], 0, wire="map"))
    assert raw[1] == [{"type": "BlockRemoved", "block_hashes": [1, 3], "medium": "GPU"}]
    newer = msgpack.packb(
        [2.0, [["BlockStored", [9], None, [1, 2], 2, None, "GPU", None, [None], 0]], 0]
    )
    assert decode_event_batch(newer)[1] == [BlockStored([9], None, [1, 2], 2)]


def test_decode_rejects_unknown_tags() -> None:
    with pytest.raises(ValueError):
        decode_event_batch(msgpack.packb([1.0, [["Nope"]]]))


def test_seq_frame_is_eight_bytes_big_endian() -> None:
    assert seq_frame(1) == b"\x00" * 7 + b"\x01"
