"""Paged KV-cache blocks and the prefix cache, with vLLM v1's semantics.

The GPU's KV memory is ``num_blocks`` blocks of ``block_size`` tokens. A sequence holds a
list of blocks (its block table); a block is shared by every sequence whose prefix it holds
and is reference-counted.

Prefix cache (``vllm/v1/core/block_pool.py``, ``kv_cache_utils.py``):

* A *full* block is named by a hash chain: ``hash_block_tokens(parent_hash, tokens)``, where
  the first block's parent is a fixed root seed. Equal hashes mean equal prefixes, so a
  lookup walks the chain and stops at the first miss (longest cached prefix, whole blocks).
* A block whose reference count drops to 0 keeps its hash and its place in the cache; it
  joins the tail of the free queue. Allocation takes free blocks from the head (least
  recently freed first) and evicts the hash of any cached block it takes (``BlockRemoved``).
  Sequences free their blocks tail first, so a sequence's last blocks are evicted before its
  prefix.
* A cache hit on a free block takes it out of the free queue again (``touch``).
* ``usage`` is the fraction of blocks with a reference count above 0: vLLM's
  ``vllm:kv_cache_usage_perc`` (free *cached* blocks count as free, as in vLLM).

Differences from vLLM, all invisible to schedulers and subscribers: there is no reserved
null block; two sequences that compute the same block at the same time keep one cached copy
(the second stays unnamed); an allocation that evicts several blocks emits one
``BlockRemoved`` listing all of them.

Hashes are Python's tuple hash of ints, masked to unsigned 64 bits. Unlike ``str`` hashes
this is not randomised per process (``PYTHONHASHSEED`` does not affect ints and tuples), so
two processes name the same prefix with the same hash, as the published events require. (The
tuple hash is CPython's, stable since 3.8 on 64-bit builds; a subscriber in another language
must not recompute hashes, only compare the published ones — vLLM's own hashes are opaque too.)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from inferplane.fleet.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

_NO_HASH = -1


class BlockPool:
    """Reference-counted KV blocks with an LRU free queue and a hash → block prefix cache.

    ``on_event`` receives a ``BlockStored`` when blocks enter the cache, a ``BlockRemoved``
    when cached blocks are evicted and an ``AllBlocksCleared`` on reset. Counters
    ``prefix_queries_tokens`` / ``prefix_hits_tokens`` are fed by :meth:`record_prefix_query`.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        on_event: Callable[[KVEvent], None] | None = None,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.on_event = on_event
        self._ref = [0] * num_blocks
        self._hash = [_NO_HASH] * num_blocks
        self._cached: dict[int, int] = {}  # block hash -> block id
        # Free blocks, head = next to allocate. Dict order gives O(1) pop/remove/append.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_queries_tokens = 0
        self.prefix_hits_tokens = 0

    # -- gauges -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks with reference count 0 (cached or not): what allocation can use."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (reference count > 0), 0–1."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks currently named in the prefix cache (in use or free)."""
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        """The reference count of one block."""
        return self._ref[block_id]

    def is_cached(self, block_hash: int) -> bool:
        """Whether a block with this hash is in the prefix cache."""
        return block_hash in self._cached

    def free_block_order(self) -> list[int]:
        """Free block ids in allocation (LRU) order."""
        return list(self._free)

    # -- prefix cache -------------------------------------------------------------------------
    def lookup(self, hashes: Iterable[int]) -> list[int]:
        """Block ids of the longest cached prefix of ``hashes`` (no reference taken)."""
        found: list[int] = []
        if not self.enable_prefix_caching:
            return found
        cached = self._cached
        for h in hashes:
            bid = cached.get(h)
            if bid is None:
                break
            found.append(bid)
        return found

    def get_computed_blocks(self, hashes: Iterable[int]) -> int:
        """How many leading ``hashes`` are cached (longest cached prefix, in blocks)."""
        return len(self.lookup(hashes))

    def record_prefix_query(self, query_tokens: int, hit_tokens: int) -> None:
        """Count one lookup as vLLM does: tokens queried, tokens hit (whole blocks)."""
        self.prefix_queries_tokens += query_tokens
        self.prefix_hits_tokens += hit_tokens

    def num_evictable(self, block_ids: Iterable[int]) -> int:
        """How many of ``block_ids`` are free (cached with reference count 0)."""
        ref = self._ref
        return sum(1 for b in block_ids if ref[b] == 0)

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cache-hit blocks, removing free ones from the free queue."""
        ref, free = self._ref, self._free
        for b in block_ids:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def cache_blocks(
        self,
        block_ids: Sequence[int],
        hashes: Sequence[int],
        parent: int | None,
        token_ids: Callable[[], list[int]] | None = None,
    ) -> None:
        """Name newly full blocks ``block_ids`` with ``hashes`` (a chain continuing ``parent``).

        Emits one ``BlockStored`` for the blocks that entered the cache; ``token_ids`` is
        called (only when someone listens) for the tokens of all ``block_ids``. A hash that
        is already cached leaves its block unnamed and is not announced again.
        """
        if not self.enable_prefix_caching:
            return
        cached, bhash = self._cached, self._hash
        fresh = True
        for b, h in zip(block_ids, hashes, strict=True):
            if h in cached or bhash[b] != _NO_HASH:
                fresh = False
                continue
            cached[h] = b
            bhash[b] = h
        if self.on_event is None:
            return
        if fresh:
            toks = token_ids() if token_ids is not None else []
            self.on_event(BlockStored(list(hashes), parent, toks, self.block_size))
            return
        # Rare path: announce only the blocks this call named, each with its own parent.
        toks = token_ids() if token_ids is not None else []
        bs = self.block_size
        for i, (b, h) in enumerate(zip(block_ids, hashes, strict=True)):
            if cached.get(h) == b and bhash[b] == h:
                par = parent if i == 0 else hashes[i - 1]
                self.on_event(BlockStored([h], par, toks[i * bs : (i + 1) * bs], bs))

    # -- allocation ---------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks in LRU order, evicting their cached hashes.

        Raises ``MemoryError`` when fewer than ``n`` blocks are free (callers check first).
        """
        free = self._free
        if n > len(free):
            raise MemoryError(f"asked for {n} KV blocks, {len(free)} free")
        ref, bhash, cached = self._ref, self._hash, self._cached
        pop = free.popitem
        out = [pop(last=False)[0] for _ in range(n)]
        evicted: list[int] = []
        for b in out:
            ref[b] = 1
            h = bhash[b]
            if h != _NO_HASH:
                bhash[b] = _NO_HASH
                if cached.get(h) == b:
                    del cached[h]
                    evicted.append(h)
        if evicted and self.on_event is not None:
            self.on_event(BlockRemoved(evicted))
        return out

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference on each block; blocks reaching 0 join the free queue's tail.

        Pass a sequence's blocks tail first (``reversed(table)``) so its last blocks are
        evicted first, as vLLM does.
        """
        ref, free = self._ref, self._free
        for b in block_ids:
            r = ref[b] - 1
            if r < 0:
                raise ValueError(f"block {b} freed more often than allocated")
            ref[b] = r
            if r == 0:
                free[b] = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash and emit ``AllBlocksCleared``.

        Like vLLM, refuses (returns False, changes nothing) while any block is in use, since
        running sequences still read their cached blocks.
        """
        if len(self._free) != self.num_blocks:
            return False
        for b in self._cached.values():
            self._hash[b] = _NO_HASH
        self._cached.clear()
        if self.on_event is not None:
            self.on_event(AllBlocksCleared())
        return True
