"""`SaltBook`: which cache scope a salted engine's first KV block belongs to.

Every request through the gateway carries a cache salt (`placement.isolation`), and an engine
that isolates by it (vLLM, SGLang, the emulator) mixes the salt into the hash of the request's
first block, so two scopes never share a block. The KV-event mirror must keep that separation:
it keys each block by the gateway's own chain hash of its token ids *started at the salt's root*
(`tokenization.salt_root`), which is what classify computes for a request of that scope
(``RequestProfile.engine_block_hashes``). A tenant's lookup then only ever matches its own
scope's blocks, and tenants of one ``cache_group`` match each other's.

A ``BlockStored`` event does not carry the salt. Its first block (no parent) is resolved here:

1. the engine hash equals the unsalted key: an unsalted request (a client that bypassed the
   gateway, an embedding) — keyed unsalted, which no salted request matches;
2. the engine hash equals the salted key of a known scope (an engine that hashes as the gateway
   does: the emulator): that scope — exact;
3. otherwise (vLLM's own hash cannot be recomputed outside it) the block is attributed to the
   scope that recently sent this first block to this endpoint (`note`, at each pick on this
   replica, or a pick another replica shared): exactly one such scope → its key; none or several
   (two scopes sent the same first block there at about the same time) → not keyed. An unkeyed
   block costs affinity misses, never a cross-scope match.

Known scopes: the configured tenants' and groups' salts (checked for every first block while
there are at most `MAX_KNOWN` of them) and the salts noted for the endpoint in the last
``horizon_s`` (a client's ``cache_salt`` narrows a scope into salts only seen at request time).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from inferplane.tokenization import hash_block_tokens, salt_root

MAX_KNOWN = 64
"""Configured scope salts tried for every first block (beyond: only the recently noted ones)."""


class SaltBook:
    """Per endpoint: the scope roots and salted first-block keys recently sent there."""

    __slots__ = ("_firsts", "_roots", "clock", "horizon_s", "known", "per_endpoint", "unresolved")

    def __init__(
        self,
        scope_salts: Iterable[str] = (),
        *,
        horizon_s: float = 120.0,
        per_endpoint: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.known: tuple[int, ...] = ()
        self.set_scopes(scope_salts)
        self.horizon_s = horizon_s
        self.per_endpoint = per_endpoint
        self.clock = clock
        self._roots: dict[str, OrderedDict[int, float]] = {}  # endpoint → root → noted at
        self._firsts: dict[str, OrderedDict[int, float]] = {}  # endpoint → first key → noted at
        self.unresolved = 0  # first blocks left unkeyed (no scope, or more than one)

    def set_scopes(self, scope_salts: Iterable[str]) -> None:
        """The cache scopes' salts (every tenant's; again after a fleet reload)."""
        roots = {salt_root(s) for s in scope_salts}
        roots.discard(None)
        known = sorted(r for r in roots if r is not None)
        self.known = tuple(known) if len(known) <= MAX_KNOWN else ()

    def note(self, endpoint: str, salt: str | None, first_key: int | None) -> None:
        """A request of the scope salted ``salt`` whose first engine block key (salted, as
        classify computed it) is ``first_key`` was sent to ``endpoint``."""
        root = salt_root(salt)
        if root is None:
            return
        now = self.clock()
        for book, key in ((self._roots, root), (self._firsts, first_key)):
            if key is None:
                continue
            d = book.get(endpoint)
            if d is None:
                d = book[endpoint] = OrderedDict()
            d[key] = now
            d.move_to_end(key)
            if len(d) > self.per_endpoint:
                d.popitem(last=False)

    def _recent(self, endpoint: str) -> list[int]:
        d = self._roots.get(endpoint)
        if not d:
            return []
        horizon = self.clock() - self.horizon_s
        while d:
            at = next(iter(d.values()))
            if at >= horizon:
                break
            d.popitem(last=False)
        return list(d)

    def resolve(self, endpoint: str, engine_hash: int, tokens: Sequence[int]) -> int | None:
        """The key of a first block (no parent) that ``endpoint`` stored as ``engine_hash``
        (see the module docstring), or None when its scope is unknown or ambiguous."""
        plain = hash_block_tokens(None, tokens)
        if engine_hash == plain:
            return plain
        firsts = self._firsts.get(endpoint)
        found: int | None = None
        several = False
        seen: set[int] = set()
        for root in (*self._recent(endpoint), *self.known):
            if root in seen:
                continue
            seen.add(root)
            key = hash_block_tokens(root, tokens)
            if key == engine_hash:
                return key
            if firsts is not None and key in firsts:
                if found is not None and found != key:
                    several = True
                found = key
        if found is None or several:
            self.unresolved += 1
            return None
        return found
