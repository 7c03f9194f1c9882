"""A bounded prefix-cache index: which block hashes each endpoint holds, LRU-evicted.

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

``match_length(endpoint, hashes)`` is the number of *leading* hashes the endpoint holds: a hash
chain means block ``i`` is only reusable when blocks ``0..i-1`` are. Every call is O(blocks) over
a dict (``OrderedDict``), and reading never changes recency, so placement stays a pure read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from inferplane.types import BlockHash


class PrefixIndex:
    """Per-endpoint LRU sets of block hashes.

    ``capacity_blocks`` bounds each endpoint's set (0 = unbounded, for a precise index whose
    engine reports its own evictions); ``set_capacity`` overrides it for one endpoint.
    """

    __slots__ = ("_blocks", "_capacity", "_covered", "capacity_blocks")

    def __init__(self, capacity_blocks: int = 0) -> None:
        if capacity_blocks < 0:
            raise ValueError("capacity_blocks must be >= 0")
        self.capacity_blocks = capacity_blocks
        self._blocks: dict[str, OrderedDict[BlockHash, None]] = {}
        self._capacity: dict[str, int] = {}
        self._covered: set[str] = set()

    # -- read side (PrefixIndexView) ------------------------------------------------------
    def match_length(self, endpoint: str, hashes: Sequence[BlockHash]) -> int:
        """How many leading ``hashes`` the endpoint holds."""
        held = self._blocks.get(endpoint)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def covers(self, endpoint: str) -> bool:
        """True once the endpoint's state was reported (KV events) or recorded."""
        return endpoint in self._covered

    def size(self, endpoint: str) -> int:
        """Blocks held for an endpoint."""
        held = self._blocks.get(endpoint)
        return len(held) if held else 0

    def endpoints(self) -> list[str]:
        return sorted(self._blocks)

    # -- write side -----------------------------------------------------------------------
    def set_capacity(self, endpoint: str, blocks: int) -> None:
        """Bound one endpoint's set (evicting at once if it is over)."""
        if blocks < 0:
            raise ValueError("blocks must be >= 0")
        if self._capacity.get(endpoint) == blocks:
            return
        self._capacity[endpoint] = blocks
        held = self._blocks.get(endpoint)
        if held is not None:
            self._evict(endpoint, held)

    def record(self, endpoint: str, hashes: Iterable[BlockHash]) -> None:
        """The endpoint now holds ``hashes`` (most recently used); evict beyond capacity."""
        held = self._blocks.get(endpoint)
        if held is None:
            held = self._blocks[endpoint] = OrderedDict()
        self._covered.add(endpoint)
        move = held.move_to_end
        for h in hashes:
            if h in held:
                move(h)
            else:
                held[h] = None
        self._evict(endpoint, held)

    def _evict(self, endpoint: str, held: OrderedDict[BlockHash, None]) -> None:
        cap = self._capacity.get(endpoint, self.capacity_blocks)
        if cap <= 0:
            return
        pop = held.popitem
        while len(held) > cap:
            pop(last=False)

    # KV events (vLLM's names) ------------------------------------------------------------
    def block_stored(self, endpoint: str, hashes: Iterable[BlockHash]) -> None:
        """``BlockStored``: the engine cached these blocks."""
        self.record(endpoint, hashes)

    def block_removed(self, endpoint: str, hashes: Iterable[BlockHash]) -> None:
        """``BlockRemoved``: the engine evicted these blocks."""
        self._covered.add(endpoint)
        held = self._blocks.get(endpoint)
        if held is None:
            return
        for h in hashes:
            held.pop(h, None)

    def all_cleared(self, endpoint: str) -> None:
        """``AllBlocksCleared``: the engine reset its prefix cache."""
        self._covered.add(endpoint)
        self._blocks.pop(endpoint, None)

    def forget(self, endpoint: str) -> None:
        """Drop an endpoint entirely (it left the fleet, or its event stream broke)."""
        self._covered.discard(endpoint)
        self._blocks.pop(endpoint, None)

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
