"""Subscribe to the engines' KV-cache events (vLLM's ZMQ publisher) and mirror them in a
precise `PrefixIndex`.

vLLM publishes on a ZMQ PUB socket multipart messages ``[topic, seq (8-byte big-endian),
payload]`` where the payload is a msgpack ``[ts, [event, ...], dp_rank]`` batch (see
`inferplane.fleet.kv_events`). One SUB socket per endpoint whose config names ``kv_events``; every
event is applied to the index under that endpoint's name, so placement sees exactly which blocks
each engine holds. A gap in sequence numbers (dropped messages, engine restart) clears that
endpoint's entries: stale "held" blocks would attract traffic to a cold cache, while a missing
block only costs one affinity miss until the engine reports it again.

**Content keys, not engine hashes.** The index is keyed by the gateway's own chain hash of each
block's *token ids* (`inferplane.tokenization.hash_block_tokens`), which classify computes for a
prompt too. An engine's own block hash cannot be recomputed outside it: vLLM's depends on its
hash algorithm (``sha256_cbor`` …), a per-process random seed unless ``PYTHONHASHSEED`` is set,
and extra keys (LoRA, multimodal, cache salt). But every ``BlockStored`` carries the blocks'
token ids and the parent's engine hash, so `BlockKeys` maps each engine hash to a content key as
it is stored and back when it is removed. For the emulated engine the two are the same numbers.

**Per cache scope.** With a `SaltBook` (the gateway always passes one) a chain starts at its
cache salt's root, as the engine's own chain does: the first block of a ``BlockStored`` is keyed
in the scope the book resolves for it (`inferplane.fleet.salts`), so a tenant's lookup matches
only its own scope's blocks (issue 12 item 6). Without a book chains start at the unsalted root.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence

import zmq
import zmq.asyncio

from inferplane.fleet.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    decode_event_batch,
)
from inferplane.fleet.model import Endpoint
from inferplane.fleet.prefix_index import PrefixIndex
from inferplane.fleet.salts import SaltBook
from inferplane.tokenization import hash_block_tokens

Resolver = Callable[[int, Sequence[int]], "int | None"]
"""(engine hash, token ids) of a first block → its key, or None (`SaltBook.resolve`)."""

log = logging.getLogger("inferplane.kv_events")


class BlockKeys:
    """One engine's block hashes mapped to content keys (see the module docstring).

    ``stored`` returns the content keys that became held (a key already held under another
    engine hash, e.g. the same tokens with a different LoRA or cache salt, is counted, not
    repeated); ``removed`` returns the keys no engine hash holds any more. A ``BlockStored``
    whose parent was never seen (the subscriber joined late, or after a gap) cannot be keyed
    and is skipped: those blocks only cost affinity misses.
    """

    __slots__ = ("_keys", "_refs", "resolve", "unkeyed")

    def __init__(self, resolve: Resolver | None = None) -> None:
        self._keys: dict[int, int] = {}  # engine hash -> content key
        self._refs: dict[int, int] = {}  # content key -> engine hashes holding it
        self.unkeyed = 0  # stored blocks skipped: their parent (or first block's scope) unknown
        self.resolve = resolve  # a first block's key (its cache scope); None: unsalted

    def __len__(self) -> int:
        return len(self._keys)

    def stored(self, ev: BlockStored) -> list[int]:
        parent: int | None = None
        if ev.parent_block_hash is not None:
            parent = self._keys.get(ev.parent_block_hash)
            if parent is None:
                self.unkeyed += len(ev.block_hashes)
                return []
        bs, toks = ev.block_size, ev.token_ids
        if bs <= 0:
            return []
        out: list[int] = []
        resolve = self.resolve if ev.parent_block_hash is None else None
        for i, h in enumerate(ev.block_hashes):
            block = toks[i * bs : (i + 1) * bs]
            if len(block) != bs:
                break
            if resolve is not None:  # the first block: keyed in its cache scope
                key = resolve(h, block)
                resolve = None
                if key is None:
                    self.unkeyed += len(ev.block_hashes)
                    return out
                parent = key
            else:
                parent = hash_block_tokens(parent, block)
            old = self._keys.get(h)
            if old == parent:
                continue  # stored again (vLLM re-announces nothing, but be idempotent)
            if old is not None:
                self._unref(old)
            self._keys[h] = parent
            n = self._refs.get(parent, 0)
            self._refs[parent] = n + 1
            if n == 0:
                out.append(parent)
        return out

    def removed(self, hashes: list[int]) -> list[int]:
        out: list[int] = []
        for h in hashes:
            key = self._keys.pop(h, None)
            if key is not None and self._unref(key):
                out.append(key)
        return out

    def _unref(self, key: int) -> bool:
        n = self._refs.get(key, 0) - 1
        if n > 0:
            self._refs[key] = n
            return False
        self._refs.pop(key, None)
        return True

    def clear(self) -> None:
        self._keys.clear()
        self._refs.clear()


class KVEventSubscriber:
    """Feeds ``index`` from every endpoint with a ``kv_events`` address, until `stop`."""

    RETRY_S = 1.0  # back-off before reconnecting after a failure
    LOG_EVERY_S = 60.0  # at most one failure log per endpoint this often

    def __init__(
        self, index: PrefixIndex, endpoints: list[Endpoint], salts: SaltBook | None = None
    ) -> None:
        self.index = index
        self.salts = salts  # keys blocks per cache scope (module docstring)
        self.endpoints = [e for e in endpoints if e.spec.kv_events]
        self.ctx = zmq.asyncio.Context.instance()
        self._tasks: list[asyncio.Task[None]] = []
        self.events_applied = 0
        self.gaps = 0
        self.failures = 0  # receive loops that failed and reconnected
        self._logged_at: dict[str, float] = {}  # endpoint -> when its last failure was logged
        self.keys: dict[str, BlockKeys] = {}  # per endpoint: engine hash -> content key

    def start(self) -> None:
        for e in self.endpoints:
            self._tasks.append(asyncio.create_task(self._run(e)))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()

    def handle(self, endpoint: str, frames: list[bytes], last_seq: int | None) -> int | None:
        """Apply one multipart message; returns its sequence number (None if malformed)."""
        if len(frames) < 3 or len(frames[-2]) != 8:
            return last_seq
        seq = int.from_bytes(frames[-2], "big")
        if last_seq is not None and seq != last_seq + 1:
            self.gaps += 1
            self.clear(endpoint)
        try:
            _, events, _ = decode_event_batch(frames[-1])
        except (ValueError, TypeError, LookupError) as exc:  # LookupError: KeyError, IndexError
            log.warning("%s: undecodable KV event batch: %s", endpoint, exc)
            return seq
        for ev in events:
            self.apply(endpoint, ev)
        return seq

    def apply(self, endpoint: str, ev: KVEvent) -> None:
        """Apply one decoded event to the index, translated to content keys."""
        keys = self.keys.get(endpoint)
        if keys is None:
            salts = self.salts
            keys = self.keys[endpoint] = BlockKeys(
                None if salts is None else functools.partial(salts.resolve, endpoint)
            )
        if isinstance(ev, BlockStored):
            self.index.block_stored(endpoint, keys.stored(ev))
        elif isinstance(ev, BlockRemoved):
            self.index.block_removed(endpoint, keys.removed(ev.block_hashes))
        elif isinstance(ev, AllBlocksCleared):
            self.clear(endpoint)
        else:  # pragma: no cover - decode_event_batch returns only these
            return
        self.events_applied += 1

    @property
    def unkeyed(self) -> int:
        """Stored blocks skipped on every endpoint because their parent was never seen."""
        return sum(k.unkeyed for k in self.keys.values())

    def clear(self, endpoint: str) -> None:
        """Forget what ``endpoint`` holds (a gap, a reset, or a broken stream)."""
        keys = self.keys.get(endpoint)
        if keys is not None:
            keys.clear()
        self.index.all_cleared(endpoint)

    async def _run(self, endpoint: Endpoint) -> None:
        """Subscribe until cancelled. Any failure (a bad address, a socket error, a bug in
        decoding) clears the endpoint's entries — what it holds is unknown from then on — and
        reconnects after `RETRY_S`, logged at most once per endpoint per `LOG_EVERY_S`."""
        while True:
            try:
                await self._subscribe(endpoint)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                self.clear(endpoint.name)
                now = time.monotonic()
                last_log = self._logged_at.get(endpoint.name)
                if last_log is None or now - last_log >= self.LOG_EVERY_S:
                    self._logged_at[endpoint.name] = now
                    log.warning(
                        "%s: KV events from %s failed (%s: %s); reconnecting every %g s",
                        endpoint.name, endpoint.spec.kv_events, type(exc).__name__, exc,
                        self.RETRY_S,
                    )
            await asyncio.sleep(self.RETRY_S)

    async def _subscribe(self, endpoint: Endpoint) -> None:
        sock = self.ctx.socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.setsockopt(zmq.LINGER, 0)
            assert endpoint.spec.kv_events is not None
            sock.connect(endpoint.spec.kv_events)
            last: int | None = None
            while True:
                frames = await sock.recv_multipart()
                last = self.handle(endpoint.name, frames, last)
        finally:
            sock.close()
