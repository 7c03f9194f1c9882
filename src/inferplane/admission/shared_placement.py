"""`SharedPlacement`: the placement state replicas share through Redis (issue 14 item 4).

Placement's own learned state — which endpoint served a session, which prompt blocks each
endpoint was sent (the learned prefix index, and blocks in flight before their KV events
arrive) — is learned from picks. A replica that sees only its own picks places a session or a
prefix that another replica placed as if it were new. With ``admission.store: redis`` and
``admission.shared_placement`` (on by default) every process:

- **publishes each pick** (write-behind: batched per event-loop turn into one pipeline, never
  awaited on the request path) on the channel ``<prefix>picks``: endpoint, workload class,
  model, cache salt, session key and the prompt's block hashes (salted: `placement.isolation`);
- **learns the other replicas' picks** from that channel as if it had made them
  (``on_pick``: the session-affinity and prefix-affinity plugins' ``learn_shared``, and the
  KV-event mirror's `SaltBook`), so every replica's learned index and session map converge
  without a read on the decision path;
- **keeps each session's endpoint in Redis** (``SET <prefix>s:<session key> <endpoint> EX
  session_ttl_s``, in the same pipeline), and reads it (`session`, one ``GET``) only for a
  session this process does not know: a replica that started, restarted or missed messages
  after the session began.

**Redis unreachable.** Nothing waits for it and nothing fails: a call that errs or takes longer
than ``timeout_s`` (of the process's running time, `inferplane.looplag.bounded`) marks Redis
down for ``retry_after_s``; meanwhile `session` answers None at
once and picks are not published (each replica places from its own picks: sessions and
prefixes it has seen keep their endpoints, the others' new ones are placed afresh). The
subscriber reconnects every ``retry_after_s``; picks made during the outage are not replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
from redis.exceptions import RedisError

from inferplane.admission.redis_state import fail_fast_client
from inferplane.looplag import MAX_STRETCH, LoopLag, bounded
from inferplane.placement.profile import RequestProfile
from inferplane.waits import stop_task

log = logging.getLogger("inferplane.admission")

_FAILURES = (RedisError, OSError, asyncio.TimeoutError)

MAX_HASHES = 512
"""Block hashes published per pick (of each kind): the prompt's head, as the index keeps it."""


@dataclass(frozen=True, slots=True)
class SharedPick:
    """One pick as another replica learns it."""

    endpoint: str
    workload_class: str
    model: str
    cache_salt: str | None
    session_key: str | None
    block_hashes: tuple[int, ...]
    engine_block_hashes: tuple[int, ...]

    def pack(self) -> list[object]:
        return [self.endpoint, self.workload_class, self.model, self.cache_salt,
                self.session_key, list(self.block_hashes[:MAX_HASHES]),
                list(self.engine_block_hashes[:MAX_HASHES])]

    @classmethod
    def unpack(cls, v: list[object]) -> SharedPick:
        ep, wc, model, salt, sk, bh, eh = v
        if not (isinstance(ep, str) and isinstance(wc, str) and isinstance(model, str)
                and isinstance(bh, list) and isinstance(eh, list)):
            raise ValueError("malformed pick")
        return cls(ep, wc, model, salt if isinstance(salt, str) else None,
                   sk if isinstance(sk, str) else None,
                   tuple(int(h) for h in bh), tuple(int(h) for h in eh))


class SharedPlacement:
    """One process's side of the shared placement state (module docstring)."""

    def __init__(
        self,
        url: str,
        prefix: str,
        *,
        on_pick: Callable[[SharedPick], None],
        session_ttl_s: float = 1800.0,
        timeout_s: float = 0.5,
        retry_after_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        lag: LoopLag | None = None,
        max_stretch: float = MAX_STRETCH,
    ) -> None:
        # each call is bounded by ``timeout_s`` of running time (`_deadline`); the client's own
        # timeouts only back that up, at its wall-time cap
        backstop = timeout_s * (max_stretch if lag is not None else 1.0)
        self.r = fail_fast_client(url, backstop, decode_responses=False)
        # the subscriber waits for messages as long as there are none: no read timeout
        self.sub = fail_fast_client(url, backstop, decode_responses=False, read_timeout=False)
        self.lag = lag
        self.max_stretch = max_stretch
        self.p = prefix
        self.channel = f"{prefix}picks"
        self.on_pick = on_pick
        self.ttl_s = max(1, round(session_ttl_s))
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.clock = clock
        self.replica = f"{os.getpid()}-{os.urandom(4).hex()}".encode()
        self._picks: list[SharedPick] = []
        self._flush: asyncio.Task[None] | None = None
        self._listen: asyncio.Task[None] | None = None
        self.down_since: float | None = None
        self._retry_at = 0.0
        self.published = 0
        self.learned = 0  # other replicas' picks applied here
        self.lookups = 0  # session GETs (sessions this process did not know)
        self.found = 0  # ... that Redis knew

    def _key(self, session_key: str) -> str:
        return f"{self.p}s:{session_key}"

    def _failed(self, exc: BaseException) -> None:
        now = self.clock()
        self._retry_at = now + self.retry_after_s
        if self.down_since is None:
            self.down_since = now
            log.error(
                "shared placement state: Redis unreachable (%s: %s); placing from this "
                "process's own state until it returns", type(exc).__name__, exc,
            )

    def _deadline(self) -> contextlib.AbstractAsyncContextManager[object]:
        """One Redis call's deadline: ``timeout_s`` of the process's running time, at most
        ``max_stretch ×`` that of wall time (`inferplane.looplag.bounded`)."""
        return bounded(self.lag, self.timeout_s, self.max_stretch)

    def _up(self) -> None:
        if self.down_since is not None:
            log.warning("shared placement state: Redis reachable again")
            self.down_since = None

    @property
    def available(self) -> bool:
        """Whether Redis may be tried now (up, or its retry time has come)."""
        return self.down_since is None or self.clock() >= self._retry_at

    # -- sessions -------------------------------------------------------------------------
    async def session(self, session_key: str) -> str | None:
        """The endpoint that last served the session on any replica (None: unknown, or Redis
        unreachable — never an error)."""
        if not self.available:
            return None
        self.lookups += 1
        try:
            async with self._deadline():
                v = await self.r.get(self._key(session_key))
        except _FAILURES as exc:
            self._failed(exc)
            return None
        self._up()
        if v is None:
            return None
        self.found += 1
        return v.decode() if isinstance(v, bytes) else str(v)

    # -- picks ----------------------------------------------------------------------------
    def picked(self, endpoint: str, profile: RequestProfile) -> None:
        """Share a pick (write-behind: sent with the other picks of this loop iteration). A pick
        with nothing to learn from (no session, a prompt shorter than one block) is not sent."""
        if not self.available or not (
            profile.session_key or profile.block_hashes or profile.engine_block_hashes
        ):
            return
        self._picks.append(SharedPick(
            endpoint, profile.workload_class, profile.model, profile.cache_salt,
            profile.session_key, profile.block_hashes, profile.engine_block_hashes,
        ))
        if self._flush is None or self._flush.done():
            self._flush = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        await asyncio.sleep(0)  # gather the picks of this loop iteration
        while self._picks:
            batch, self._picks = self._picks, []
            if not self.available:
                return
            payload = msgpack.packb([self.replica, [p.pack() for p in batch]])
            try:
                async with self.r.pipeline(transaction=False) as pipe:
                    for p in batch:
                        if p.session_key is not None:
                            pipe.set(self._key(p.session_key), p.endpoint, ex=self.ttl_s)
                    pipe.publish(self.channel, payload)
                    async with self._deadline():
                        await pipe.execute()
            except _FAILURES as exc:
                self._failed(exc)
                return
            self._up()
            self.published += len(batch)

    def handle(self, data: bytes) -> int:
        """Apply one published batch of another replica's picks; returns how many."""
        try:
            replica, picks = msgpack.unpackb(data)
            if replica == self.replica:
                return 0
            batch = [SharedPick.unpack(v) for v in picks]
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            log.warning("shared placement state: undecodable pick message: %s", exc)
            return 0
        for p in batch:
            try:
                self.on_pick(p)
            except Exception:  # one bad pick (e.g. an endpoint this fleet lacks) skips itself
                log.exception("shared placement state: applying a pick failed")
        self.learned += len(batch)
        return len(batch)

    async def _run(self) -> None:
        while True:
            try:
                ps = self.sub.pubsub()
                try:
                    await ps.subscribe(self.channel)
                    self._up()
                    while True:
                        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if msg is not None and msg.get("type") == "message":
                            self.handle(msg["data"])
                finally:
                    with contextlib.suppress(*_FAILURES):
                        await ps.aclose()  # type: ignore[no-untyped-call, unused-ignore]
            except asyncio.CancelledError:
                raise
            except _FAILURES as exc:
                self._failed(exc)
            except Exception:  # a bug here must not stop the sharing for good
                log.exception("shared placement state: subscriber failed")
            await asyncio.sleep(self.retry_after_s)

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, degraded: Callable[[BaseException], bool] | None = None) -> None:
        """Redis must answer, unless ``degraded`` says its failure is one to start through (the
        admission store started in an outage it was killed in): then the sharing starts as
        during any outage."""
        try:
            async with self._deadline():  # in running time, as every other call
                await self.r.ping()
        except _FAILURES as exc:
            if degraded is None or not degraded(exc):
                raise
            self._failed(exc)
        self._listen = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        for task in (self._listen, self._flush):
            if (exc := await stop_task(task)) is not None:  # cancelled again if it ran on
                log.error("shared placement state: a background task had failed: %r", exc)
        await self.r.aclose()
        await self.sub.aclose()
