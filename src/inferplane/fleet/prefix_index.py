"""A bounded prefix-cache index: which endpoints hold which block hashes, inverted.

Two uses, one structure:

* **approximate** — a placement plugin records the prompt block hashes of every request it sends
  to an endpoint (``record``), the way the Gateway API Inference Extension's prefix plugin and
  SGLang's router learn from their own routing history. It never hears of evictions, so each
  endpoint's set is bounded by a capacity in blocks (ideally the engine's KV capacity expressed
  in hash blocks) and evicts least recently used hashes.
* **precise** — fed by the engines' KV events (``block_stored`` / ``block_removed`` /
  ``all_cleared``, or ``apply`` with vLLM's ``BlockStored`` / ``BlockRemoved`` /
  ``AllBlocksCleared`` event objects), it mirrors what each engine actually caches and serves as
  the snapshot's `PrefixIndexView`. ``covers(endpoint)`` says whether events have been seen for
  an endpoint; placement falls back to its approximate index for endpoints not covered.

Layout (the shape of llm-d's KV-cache indexer: block key → the pods holding it): one dict maps
each block hash to a **bitmask of endpoint slots** (each endpoint owns one bit), so a block held
by many endpoints is one entry, and ``match_lengths(hashes)`` answers "who holds how much of
this prefix" for every endpoint in **one walk** of the prompt's chain: AND the masks block by
block; an endpoint's match length is the block at which its bit drops out. Per-endpoint
bookkeeping is only what eviction needs: a block count, and for a *bounded* endpoint (capacity
> 0: the learned index) an LRU order of its blocks. An unbounded endpoint (the KV-event mirror,
whose engine reports its own evictions) keeps no per-block state of its own: clearing it retires
its slot (the bit is masked off at once, and swept out of the map when enough slots are retired).

``match_length(endpoint, hashes)`` is the number of *leading* hashes one endpoint holds: a hash
chain means block ``i`` is only reusable when blocks ``0..i-1`` are. Reading never changes
recency, so placement stays a pure read.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence

from inferplane.types import BlockHash


def _decode(v: int) -> int:
    """A map value as a bitmask: a single holder is stored as ``~slot`` (a small int, where
    ``1 << slot`` would be a 1,000-bit one at fleet scale), several as their bitmask."""
    return (1 << ~v) if v < 0 else v


def _encode(mask: int) -> int:
    """A non-empty bitmask as a map value (see `_decode`)."""
    return ~(mask.bit_length() - 1) if mask & (mask - 1) == 0 else mask


def _bits(mask: int) -> Iterator[int]:
    """Indexes of the set bits of ``mask``, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class PrefixIndex:
    """Inverted index block hash → endpoints (bitmask), with per-endpoint LRU bounds.

    ``capacity_blocks`` bounds each endpoint's set (0 = unbounded, for a precise index whose
    engine reports its own evictions); ``set_capacity`` overrides it for one endpoint.
    """

    __slots__ = (
        "_capacity",
        "_covered",
        "_dead",
        "_free",
        "_holders",
        "_live",
        "_names",
        "_next_slot",
        "_recency",
        "_sizes",
        "_slot",
        "capacity_blocks",
        "sweep_at",
    )

    def __init__(self, capacity_blocks: int = 0, *, sweep_at: int = 16) -> None:
        if capacity_blocks < 0:
            raise ValueError("capacity_blocks must be >= 0")
        self.capacity_blocks = capacity_blocks
        # retired slots (cleared unbounded endpoints) are swept out of the map at this many,
        # or at a quarter of the live ones if more
        self.sweep_at = sweep_at
        self._holders: dict[BlockHash, int] = {}  # block → endpoint slots (`_encode`)
        self._slot: dict[str, int] = {}  # endpoint → its slot (bit index)
        self._names: dict[int, str] = {}  # live slot → endpoint
        self._live = 0  # mask of live slots
        self._dead = 0  # mask of retired slots still present in _holders
        self._free: list[int] = []  # slots reusable (swept)
        self._next_slot = 0
        self._sizes: dict[str, int] = {}  # endpoint → blocks held
        self._recency: dict[str, OrderedDict[BlockHash, None]] = {}  # bounded endpoints only
        self._capacity: dict[str, int] = {}
        self._covered: set[str] = set()

    # -- read side (PrefixIndexView) ------------------------------------------------------
    def mask_of(self, endpoints: Iterable[str]) -> int:
        """The slot mask of ``endpoints`` (those without blocks are left out)."""
        slots = self._slot
        mask = 0
        for e in endpoints:
            slot = slots.get(e)
            if slot is not None:
                mask |= 1 << slot
        return mask

    def match_lengths(
        self, hashes: Sequence[BlockHash], among: int | None = None
    ) -> dict[str, int]:
        """Every endpoint holding at least the first block → how many leading ``hashes`` it
        holds, in one walk of the chain (endpoints holding none are absent). ``among`` (a
        `mask_of`) restricts the answer to those endpoints: the walk then costs the prompt's
        length and the endpoints asked about, however many others hold the prefix."""
        if not hashes:
            return {}
        holders = self._holders
        cur = _decode(holders.get(hashes[0], 0)) & self._live
        if among is not None:
            cur &= among
        if not cur:
            return {}
        names = self._names
        out: dict[str, int] = {}
        get = holders.get
        n = len(hashes)
        for i in range(1, n):
            v = get(hashes[i], 0)
            nxt = cur & ((1 << ~v) if v < 0 else v)
            if nxt != cur:
                for b in _bits(cur & ~nxt):
                    out[names[b]] = i
                if not nxt:
                    return out
                cur = nxt
        for b in _bits(cur):
            out[names[b]] = n
        return out

    def longest(self, hashes: Sequence[BlockHash], limit: int) -> list[tuple[str, int]]:
        """At most ``limit`` endpoints holding the longest leading runs of ``hashes``, longest
        first, with their lengths: one walk of the chain, then only as many endpoints as asked
        for are read out (a prefix every endpoint shares costs no per-endpoint work)."""
        if not hashes or limit <= 0:
            return []
        holders = self._holders
        cur = _decode(holders.get(hashes[0], 0)) & self._live
        if not cur:
            return []
        get = holders.get
        drops: list[tuple[int, int]] = []  # (length, endpoints whose run ends there)
        n = len(hashes)
        for i in range(1, n):
            v = get(hashes[i], 0)
            nxt = cur & ((1 << ~v) if v < 0 else v)
            if nxt != cur:
                drops.append((i, cur & ~nxt))
                if not nxt:
                    break
                cur = nxt
        else:
            drops.append((n, cur))
        names = self._names
        out: list[tuple[str, int]] = []
        for length, mask in reversed(drops):
            for b in _bits(mask):
                out.append((names[b], length))
                if len(out) >= limit:
                    return out
        return out

    def match_length(self, endpoint: str, hashes: Sequence[BlockHash]) -> int:
        """How many leading ``hashes`` the endpoint holds."""
        slot = self._slot.get(endpoint)
        if slot is None:
            return 0
        bit = 1 << slot
        get = self._holders.get
        n = 0
        for h in hashes:
            v = get(h, 0)
            if (~v != slot) if v < 0 else not v & bit:
                break
            n += 1
        return n

    def covers(self, endpoint: str) -> bool:
        """True once the endpoint's state was reported (KV events) or recorded."""
        return endpoint in self._covered

    def size(self, endpoint: str) -> int:
        """Blocks held for an endpoint."""
        return self._sizes.get(endpoint, 0)

    def endpoints(self) -> list[str]:
        """Endpoints with blocks recorded (since their last clear)."""
        return sorted(self._slot)

    def endpoint_count(self) -> int:
        """Endpoints with blocks recorded (since their last clear)."""
        return len(self._slot)

    def distinct_blocks(self) -> int:
        """Entries of the inverted map (block hashes held by at least one endpoint)."""
        return len(self._holders)

    # -- write side -----------------------------------------------------------------------
    def _cap(self, endpoint: str) -> int:
        return self._capacity.get(endpoint, self.capacity_blocks)

    def _slot_of(self, endpoint: str) -> int:
        slot = self._slot.get(endpoint)
        if slot is None:
            if self._free:
                slot = self._free.pop()
            else:
                slot = self._next_slot
                self._next_slot += 1
            self._slot[endpoint] = slot
            self._names[slot] = endpoint
            self._live |= 1 << slot
            self._sizes.setdefault(endpoint, 0)
        return slot

    def set_capacity(self, endpoint: str, blocks: int) -> None:
        """Bound one endpoint's set (evicting at once if it is over). An endpoint that was
        unbounded keeps no LRU order: bounding it evicts its blocks in no particular order."""
        if blocks < 0:
            raise ValueError("blocks must be >= 0")
        if self._capacity.get(endpoint, -1) == blocks:
            return
        self._capacity[endpoint] = blocks
        slot = self._slot.get(endpoint)
        if slot is None:
            return
        if blocks <= 0:
            self._recency.pop(endpoint, None)
            return
        held = self._recency.get(endpoint)
        if held is None:  # unbounded until now: its blocks in no particular order
            bit = 1 << slot
            held = self._recency[endpoint] = OrderedDict(
                (h, None) for h, m in self._holders.items() if _decode(m) & bit
            )
        self._evict(endpoint, slot, held)

    def record(self, endpoint: str, hashes: Iterable[BlockHash]) -> None:
        """The endpoint now holds ``hashes`` (most recently used); evict beyond capacity."""
        self._covered.add(endpoint)
        slot = self._slot_of(endpoint)
        bit = 1 << slot
        holders = self._holders
        get = holders.get
        added = 0
        if self._cap(endpoint) <= 0:
            for h in hashes:
                v = get(h)
                if v is None:
                    holders[h] = ~slot
                    added += 1
                    continue
                m = _decode(v)
                if not m & bit:
                    holders[h] = m | bit
                    added += 1
            self._sizes[endpoint] += added
            return
        held = self._recency.get(endpoint)
        if held is None:
            held = self._recency[endpoint] = OrderedDict()
        move = held.move_to_end
        it = iter(hashes)
        if isinstance(hashes, (tuple, list)):
            try:
                # the chain's leading blocks already held (a shared system prompt, a
                # conversation's earlier turns) only move to the end: `map` does that without
                # a Python step each, and stops at the first block not held
                deque(map(move, it), maxlen=0)
            except KeyError as e:
                if len(e.args) != 1:
                    raise
                # `move_to_end`'s KeyError(block): the first block not held; `it` is past it
                h = e.args[0]
                held[h] = None
                v = get(h)
                holders[h] = ~slot if v is None else _decode(v) | bit
                added = 1
        for h in it:  # (the rest of the chain, in order, as above)
            if h in held:
                move(h)
            else:
                held[h] = None
                v = get(h)
                holders[h] = ~slot if v is None else _decode(v) | bit
                added += 1
        self._sizes[endpoint] += added
        self._evict(endpoint, slot, held)

    def _evict(self, endpoint: str, slot: int, held: OrderedDict[BlockHash, None]) -> None:
        cap = self._cap(endpoint)
        if cap <= 0 or len(held) <= cap:
            return
        keep = ~(1 << slot)
        holders = self._holders
        pop = held.popitem
        n = 0
        while len(held) > cap:
            h, _ = pop(last=False)
            m = _decode(holders[h]) & keep
            if m:
                holders[h] = _encode(m)
            else:
                del holders[h]
            n += 1
        self._sizes[endpoint] -= n

    # KV events (vLLM's names) ------------------------------------------------------------
    def block_stored(self, endpoint: str, hashes: Iterable[BlockHash]) -> None:
        """``BlockStored``: the engine cached these blocks."""
        self.record(endpoint, hashes)

    def block_removed(self, endpoint: str, hashes: Iterable[BlockHash]) -> None:
        """``BlockRemoved``: the engine evicted these blocks."""
        self._covered.add(endpoint)
        slot = self._slot.get(endpoint)
        if slot is None:
            return
        bit = 1 << slot
        keep = ~bit
        holders = self._holders
        held = self._recency.get(endpoint)
        n = 0
        for h in hashes:
            m = _decode(holders.get(h, 0))
            if m & bit:
                m &= keep
                if m:
                    holders[h] = _encode(m)
                else:
                    del holders[h]
                n += 1
                if held is not None:
                    held.pop(h, None)
        self._sizes[endpoint] -= n

    def all_cleared(self, endpoint: str) -> None:
        """``AllBlocksCleared``: the engine reset its prefix cache."""
        self._covered.add(endpoint)
        self._drop(endpoint)

    def forget(self, endpoint: str) -> None:
        """Drop an endpoint entirely (it left the fleet, or its event stream broke)."""
        self._covered.discard(endpoint)
        self._drop(endpoint)

    def _drop(self, endpoint: str) -> None:
        slot = self._slot.pop(endpoint, None)
        self._sizes.pop(endpoint, None)
        if slot is None:
            return
        bit = 1 << slot
        del self._names[slot]
        self._live &= ~bit
        held = self._recency.pop(endpoint, None)
        if held is not None:  # bounded: its blocks are listed, clear them now
            keep = ~bit
            holders = self._holders
            for h in held:
                m = _decode(holders[h]) & keep
                if m:
                    holders[h] = _encode(m)
                else:
                    del holders[h]
            self._free.append(slot)
            return
        self._dead |= bit  # unbounded: retire the slot, sweep later
        dead = self._dead.bit_count()
        if dead >= max(self.sweep_at, self._live.bit_count() // 4):
            self.sweep()

    def sweep(self) -> None:
        """Remove retired slots' bits from the map (one pass over it) and free the slots."""
        dead = self._dead
        if not dead:
            return
        keep = ~dead
        holders = self._holders
        for h, v in list(holders.items()):
            m = _decode(v)
            if m & dead:
                m &= keep
                if m:
                    holders[h] = _encode(m)
                else:
                    del holders[h]
        self._free.extend(_bits(dead))
        self._dead = 0

    def apply(self, endpoint: str, event: object) -> None:
        """Apply one decoded vLLM KV event (``BlockStored``, ``BlockRemoved`` or
        ``AllBlocksCleared``, matched by class name so placement needs no import of the
        event codec). Unknown events raise ``ValueError``."""
        kind = type(event).__name__
        if kind == "AllBlocksCleared":
            self.all_cleared(endpoint)
            return
        hashes = getattr(event, "block_hashes", None)
        if hashes is None:
            raise ValueError(f"unknown KV event {kind!r}")
        if kind == "BlockStored":
            self.block_stored(endpoint, hashes)
        elif kind == "BlockRemoved":
            self.block_removed(endpoint, hashes)
        else:
            raise ValueError(f"unknown KV event {kind!r}")
