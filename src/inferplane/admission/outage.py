"""`OutageStore`: the shared admission store with a documented policy for when Redis is down.

It wraps `RedisStore` and never lets a Redis failure become a 500. While Redis cannot be
reached (an error, or a timeout of ``admission.redis_timeout_s``), each operation degrades on
its own terms. The timeout counts the gateway's running time (with a `LoopLag`: a call that
Redis answered in time is not failed because the gateway's own event loop ran late; it fires
by ``gateway.lag_max_stretch ×`` the timeout of wall time in any case):

======================  ============================================================================
operation               while Redis is unreachable
======================  ============================================================================
retry markers, loop     local, in this process (a retry that lands on another replica is not
counters                recognised; loop limits count per replica)
rate limits (`take`)    local token buckets in this process: a tenant's limit holds per replica
budgets (`reserve`)     **fail closed**: 503 ``store_unavailable`` with Retry-After: a budget that
                        cannot be checked admits nothing (tenants without budgets are unaffected)
settle, usage           **journaled** in this process and replayed, in order, once Redis answers
                        again: spend settled during the outage is not lost (a lease reserved before
                        the outage keeps holding its worst case until its settle is replayed; a
                        reserve that timed out may still run in Redis, so its lease is given back
                        by a journaled zero settle)
usage / counter reads   503 ``store_unavailable`` with Retry-After
======================  ============================================================================

After a failure Redis is not asked again for ``retry_after_s`` (every call takes the local path
at once instead of waiting for a timeout); a background task then probes it, replays the journal
and the store is back in service.

The journal is durable when it has a file (`admission.journal.OutageJournal`,
``admission.journal_path``, by default next to the ledger): a settle returns only once its
entry is committed there, and an entry is deleted only after Redis applied it. A gateway killed
during an outage finds the entries at its next start and replays them when Redis answers; it
starts even while Redis is still down when its journal holds entries (the journal shows Redis
is its store, and that it was in an outage), and with ``admission.start_without_redis`` (the
default) also when Redis refuses connections, times out or is loading (`transient`): a replica
restarted during an outage starts degraded as the running ones serve. A wrong URL, an unknown
host, refused credentials or ACL permissions and a TLS mismatch stay start-up errors. Each entry
is applied once however often it is replayed: Redis remembers each settle id for
``admission.settle_id_ttl_s`` (usage updates journaled without one are given one). Without a
file the journal is in memory, and a replica killed during an outage loses what it had not
replayed (its leases then expire in Redis).

Redis that lost its data (restarted without persistence) would silently reset every budget:
``<prefix>epoch`` holds a random value written once, and the store reads it at start, each time
Redis answers again after an outage, and every ``EPOCH_CHECK_S`` (a Redis restarted between two
calls is reconnected to by the client without an error); a value missing or changed is logged as
an ERROR and counted (``resets``, ``inferplane_admission_store_resets_total``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from inferplane.admission.journal import OutageJournal, Payload
from inferplane.admission.redis_state import RedisStore
from inferplane.admission.state import (
    BucketDemand,
    CounterDemand,
    CounterState,
    MemoryStore,
    StoreHealth,
    UsageRow,
)
from inferplane.errors import StoreUnavailableError
from inferplane.errors import described as _describe
from inferplane.looplag import MAX_STRETCH, LoopLag, bounded
from inferplane.waits import stop_task

T = TypeVar("T")
log = logging.getLogger("inferplane.admission")

_FAILURES = (RedisError, OSError, asyncio.TimeoutError)
EPOCH_CHECK_S = 5.0  # how often a process reads ``<prefix>epoch`` while Redis answers
# at start-up: refused, or no answer (a timeout; no route to the host or network)
_DOWN_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                          errno.ETIMEDOUT})


def transient(exc: BaseException) -> bool:
    """Whether a failure to reach Redis at start-up is one a Redis that is down, restarting or
    loading gives (refused, a timeout, no route to it, ``LOADING``, a temporary DNS failure),
    rather than a configuration error (an unknown host, refused credentials or ACL permissions
    (``NOPERM``, ``WRONGPASS``), a TLS mismatch either way round: a connection closed or reset
    by the server, an SSL error; an answer that is not Redis's)."""
    if isinstance(exc, (asyncio.TimeoutError, RedisTimeoutError, BusyLoadingError)):
        return True
    if isinstance(exc, AuthenticationError):
        return False
    cause: BaseException | None = exc
    if isinstance(exc, RedisConnectionError):
        # none: "Connection closed by server", as a TLS-only Redis answers a plaintext client
        cause = exc.__cause__ or exc.__context__
    if isinstance(cause, socket.gaierror):
        return cause.errno == socket.EAI_AGAIN  # a DNS blip, not a name that does not exist
    return isinstance(cause, OSError) and cause.errno in _DOWN_ERRNOS


@dataclass(slots=True, eq=False)
class Entry:
    """One journaled update: ``kind`` (settle | usage), its arguments, and the task that commits
    it to the journal file (its sequence number)."""

    kind: str
    payload: Payload
    written: asyncio.Future[int]


def _age(seconds: float) -> str:
    """A journal's age for a log line: seconds, minutes, hours or days."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _settle_payload(
    counters: Sequence[CounterDemand], lease_id: str, usd: float, tokens: int, now: float
) -> Payload:
    return {"counters": [dataclasses.asdict(d) for d in counters], "lease": lease_id,
            "usd": usd, "tokens": tokens, "now": now}


class OutageStore:
    """`AdmissionStore` on Redis that degrades (see the module docstring) instead of failing."""

    def __init__(
        self,
        remote: RedisStore,
        *,
        retry_after_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        journal: OutageJournal | None = None,
        lag: LoopLag | None = None,
        max_stretch: float = MAX_STRETCH,
        start_degraded: bool = False,
        epoch_check_s: float = EPOCH_CHECK_S,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.remote = remote
        self.wall = wall  # Unix time: a journal entry's ``at``, read by a later process
        self.start_degraded = start_degraded
        self.epoch: str | None = None  # ``<prefix>epoch`` as this process last saw it
        self.resets = 0  # times Redis was found to have lost its data
        self._epoch_check: asyncio.Task[None] | None = None
        self.epoch_check_s = epoch_check_s
        self._epoch_watch: asyncio.Task[None] | None = None
        self._eviction_checked = False  # maxmemory-policy asked once Redis answered
        self.lag = lag
        self.max_stretch = max_stretch
        self.local = MemoryStore()
        self.retry_after_s = retry_after_s
        self.clock = clock
        self.down_since: float | None = None
        self._retry_at = 0.0
        self.store = journal or OutageJournal()  # where the journal survives a restart
        self.journal: deque[Entry] = deque()
        self.journal_settles = 0  # how many of `journal` are settles (kept as it changes)
        self._reconciler: asyncio.Task[None] | None = None
        self.outages = 0
        self.dropped = 0  # never: every update is replayed (the totals read as the SQLite store's)
        self.replayed = 0
        self._replayed_before = 0  # `replayed` when the current outage began
        # the oldest entry an earlier process journaled (Unix time), until its replay begins
        self._inherited_at: float | None = None
        self._old_warned = -1  # `outages` when the journal's age was last warned about

    # -- state ----------------------------------------------------------------------------
    @property
    def up(self) -> bool:
        return self.down_since is None

    def health(self) -> StoreHealth:
        """For ``/metrics``: whether Redis answers, and what the journal holds for it (running
        counts: O(1) however long an outage's journal grows)."""
        settles = self.journal_settles
        down = self.down_since
        return StoreHealth(
            up=down is None, down_for_s=0.0 if down is None else max(0.0, self.clock() - down),
            pending_settles=settles, pending_usage=len(self.journal) - settles,
        )

    def _unavailable(self, what: str) -> StoreUnavailableError:
        return StoreUnavailableError.retry_after(
            "the shared admission store (Redis) is unreachable", what, self.retry_after_s
        )

    def _failed(self, exc: BaseException) -> None:
        now = self.clock()
        self._retry_at = now + self.retry_after_s
        if self.down_since is None:
            self.down_since = now
            self.outages += 1
            self._replayed_before = self.replayed
            log.error(
                "admission store (Redis) unreachable (%s: %s): budgets fail closed with 503, "
                "rate limits and retry markers are local, settles are journaled",
                type(exc).__name__, exc,
            )
        self._ensure_reconciler()

    async def _try(self, call: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        """(True, result) from Redis, or (False, None) when it is (or just went) down."""
        if self.down_since is not None and self.clock() < self._retry_at:
            return False, None
        if self.journal:  # settles must reach Redis in order: the reconciler replays first
            return False, None
        try:
            async with self._deadline():
                result = await call()
        except _FAILURES as exc:
            self._failed(exc)
            return False, None
        if self.down_since is not None:
            self._back()
            self._epoch_check = asyncio.ensure_future(self._check_epoch())
        return True, result

    def _deadline(self) -> contextlib.AbstractAsyncContextManager[object]:
        """One Redis call's deadline: ``admission.redis_timeout_s`` of running time
        (`inferplane.looplag.bounded`)."""
        return bounded(self.lag, self.remote.timeout_s, self.max_stretch)

    def _back(self) -> None:
        assert self.down_since is not None
        log.warning(
            "admission store (Redis) reachable again after %.1f s; %d journaled updates replayed",
            self.clock() - self.down_since, self.replayed - self._replayed_before,
        )  # this outage's: `replayed` counts every outage of the process
        self.down_since = None

    async def _check_epoch(self, strict: bool = False) -> None:
        """Read ``<prefix>epoch`` (written when missing). At the first read it is remembered;
        at a later one (Redis answering again) a value missing or changed means Redis lost its
        data: logged as an ERROR and counted. A failure to read it is left to the next
        reconnect, unless ``strict`` (at start-up: a Redis that answers PING but refuses the
        script, an ACL without ``@scripting`` or the prefix's keys, is a start-up error). The
        first read that succeeds also checks ``maxmemory-policy`` (`_warn_eviction`), so a
        process that started while Redis was down warns once it answers."""
        fresh = os.urandom(8).hex()
        try:
            async with self._deadline():
                seen = await self.remote.epoch(fresh)
        except _FAILURES:
            if strict:
                raise
            return
        if self.epoch is not None and seen != self.epoch:
            self.resets += 1
            log.error(
                "admission store (Redis) lost its data (%s): budgets, usage, leases and rate "
                "limits restarted from zero; Redis keeps them only as durably as its persistence "
                "(docs/shared-state.md)",
                "its epoch key was missing" if seen == fresh else "its epoch key changed",
            )
        self.epoch = seen
        if not self._eviction_checked:
            self._eviction_checked = True
            await self._warn_eviction()

    async def _watch_epoch(self) -> None:
        """Every ``epoch_check_s`` while Redis answers: `_check_epoch`."""
        while True:
            await asyncio.sleep(self.epoch_check_s)
            if self.up and not self.journal:
                try:
                    await self._check_epoch()
                except Exception:  # a bug here must not stop the watch
                    log.exception("admission store (Redis): epoch check failed")

    async def _warn_eviction(self) -> None:
        """A Redis that evicts keys at ``maxmemory`` drops budget counters (they have a TTL) and
        resets those budgets silently: say so once, when Redis first answers."""
        with contextlib.suppress(*_FAILURES):  # INFO may be renamed away (managed Redis)
            async with self._deadline():
                limit, policy = await self.remote.memory_policy()
            if limit > 0 and policy and policy != "noeviction":
                log.warning(
                    "admission store (Redis) has maxmemory %d B with maxmemory-policy %s: at "
                    "the limit it evicts keys, budget counters included (a budget evicted is "
                    "reset with nothing logged); set maxmemory-policy noeviction "
                    "(docs/shared-state.md, sizing)", limit, policy,
                )

    # -- reconciliation -------------------------------------------------------------------
    def _push(self, entry: Entry) -> None:
        self.journal.append(entry)
        if entry.kind == "settle":
            self.journal_settles += 1

    def _ensure_reconciler(self) -> None:
        if self._reconciler is None or self._reconciler.done():
            with contextlib.suppress(RuntimeError):  # no running loop: the next call starts it
                self._reconciler = asyncio.get_running_loop().create_task(self._reconcile())

    async def _journal(self, kind: str, payload: Payload) -> None:
        """Queue an update for Redis (in order) and return once it is committed to the journal
        file (a file that cannot be written is logged: the update is still replayed from
        memory). The entry carries when it was journaled (``at``, Unix time), which a later
        process that replays it compares with ``admission.settle_id_ttl_s``
        (`_warn_if_older_than_ids`)."""
        payload = {**payload, "at": self.wall()}
        written = asyncio.ensure_future(self.store.append(kind, payload))
        self._push(Entry(kind, payload, written))
        self._ensure_reconciler()
        try:
            await asyncio.shield(written)
        except Exception as exc:
            log.error("admission outage journal %s not written (%s: %s): the update is kept in "
                      "memory only", self.store.path, type(exc).__name__, exc)

    async def _apply(self, e: Entry) -> None:
        p = e.payload
        if e.kind == "settle":
            counters = [CounterDemand(**d) for d in p["counters"]]
            await self.remote.settle(counters, p["lease"], p["usd"], p["tokens"], p["now"])
        else:
            await self.remote.add_usage(p["tenant"], tuple(p["group"]), p["usd"], p["prompt"],
                                        p["completion"], p["settle_id"])

    def _warn_if_older_than_ids(self) -> None:
        """Before a replay: one WARNING per outage when the oldest entry to replay (journaled
        by an earlier process, or by this one during an outage that lasted that long) is
        older than ``admission.settle_id_ttl_s``. Redis remembers a settle's id that long after
        the settle reached it, so an entry that had reached Redis before (an update that timed
        out but ran, a process killed between applying and deleting it) is no longer
        recognised and counts twice."""
        inherited, self._inherited_at = self._inherited_at, None
        if not self.journal or self._old_warned == self.outages:
            return
        first = self.journal[0].payload.get("at")
        ats = [a for a in (inherited, first) if isinstance(a, int | float)]
        if not ats:
            return
        age = self.wall() - min(ats)
        ttl = self.remote.settle_id_ttl_s
        if age > ttl:
            self._old_warned = self.outages
            log.warning(
                "replaying admission updates journaled %s ago, longer than "
                "admission.settle_id_ttl_s (%g s): Redis no longer remembers the ids of "
                "updates that reached it before, so any of these that had (a timed-out "
                "update that still ran, a process killed between applying and deleting one) "
                "counts twice in budgets and usage", _age(age), ttl,
            )

    async def _replay(self) -> None:
        """Apply the journal in Redis, in order; each entry leaves the file once applied."""
        self._warn_if_older_than_ids()
        while self.journal:
            e = self.journal[0]
            seq: int | None = None
            with contextlib.suppress(Exception):  # not in the file (logged): memory only
                seq = await asyncio.shield(e.written)
            async with self._deadline():
                await self._apply(e)
            if self.journal.popleft().kind == "settle":
                self.journal_settles -= 1
            self.replayed += 1
            if seq is not None:
                with contextlib.suppress(Exception):  # applied once however often it replays
                    await self.store.remove(seq)

    async def _reconcile(self) -> None:
        """Probe Redis every ``retry_after_s``; once it answers, replay the journal in order."""
        while self.down_since is not None or self.journal:
            await asyncio.sleep(max(0.0, self._retry_at - self.clock()))
            try:
                async with self._deadline():
                    await self.remote.ping()
                await self._check_epoch()
                await self._replay()
            except _FAILURES as exc:
                self._failed(exc)
                continue
            if self.down_since is not None:
                self._back()

    # -- AdmissionStore -------------------------------------------------------------------
    async def reserve(
        self, counters: Sequence[CounterDemand], lease_id: str, expires_at: float, now: float
    ) -> int:
        if not counters:
            return -1
        sent = False

        def call() -> Awaitable[int]:
            nonlocal sent
            sent = True
            return self.remote.reserve(counters, lease_id, expires_at, now)

        ok, failed = await self._try(call)
        if not ok:
            if sent:  # it may still run in Redis (a timeout): give its lease back on replay
                await self._journal("settle", _settle_payload(counters, lease_id, 0.0, 0, now))
            raise self._unavailable("this tenant's budget")
        assert failed is not None
        return failed

    async def settle(
        self,
        counters: Sequence[CounterDemand],
        lease_id: str,
        usd: float,
        tokens: int,
        now: float,
    ) -> None:
        if not counters:
            return

        def call() -> Awaitable[None]:
            return self.remote.settle(counters, lease_id, usd, tokens, now)

        ok, _ = await self._try(call)
        if not ok:  # returns once the entry is committed to the journal file
            await self._journal("settle", _settle_payload(counters, lease_id, usd, tokens, now))

    async def counter(self, key: str, now: float) -> CounterState:
        ok, st = await self._try(lambda: self.remote.counter(key, now))
        if not ok or st is None:
            raise self._unavailable("the budget counter")
        return st

    async def take(self, buckets: Sequence[BucketDemand], now: float) -> float:
        if not buckets:
            return 0.0
        ok, wait = await self._try(lambda: self.remote.take(buckets, now))
        if not ok or wait is None:
            return await self.local.take(buckets, now)
        return wait

    async def marked(self, key: str, now: float) -> bool:
        ok, seen = await self._try(lambda: self.remote.marked(key, now))
        if not ok or seen is None:
            return await self.local.marked(key, now)
        return seen

    async def mark(self, key: str, ttl_s: float, now: float) -> None:
        ok, _ = await self._try(lambda: self.remote.mark(key, ttl_s, now))
        if not ok:
            await self.local.mark(key, ttl_s, now)

    async def unmark(self, key: str) -> None:
        ok, _ = await self._try(lambda: self.remote.unmark(key))
        if not ok:
            await self.local.unmark(key)

    async def incr(self, key: str, ttl_s: float, now: float) -> int:
        ok, n = await self._try(lambda: self.remote.incr(key, ttl_s, now))
        if not ok or n is None:
            return await self.local.incr(key, ttl_s, now)
        return n

    async def add_usage(
        self,
        tenant: str,
        group: Sequence[str],
        usd: float,
        prompt: int,
        completion: int,
        settle_id: str | None = None,
    ) -> None:
        def call() -> Awaitable[None]:
            return self.remote.add_usage(tenant, group, usd, prompt, completion, settle_id)

        ok, _ = await self._try(call)
        if not ok:  # an id of its own if it had none, so that a replay applies it once
            payload: dict[str, Any] = {
                "tenant": tenant, "group": list(group), "usd": usd, "prompt": prompt,
                "completion": completion, "settle_id": settle_id or os.urandom(8).hex(),
            }
            await self._journal("usage", payload)

    async def usage(self, tenant: str) -> list[UsageRow]:
        ok, rows = await self._try(lambda: self.remote.usage(tenant))
        if not ok or rows is None:
            raise self._unavailable("usage")
        return rows

    async def ping(self) -> bool:
        """At start-up: load what an earlier process journaled and did not replay, then ask
        Redis. Redis must answer (a wrong URL is a start-up error, not an outage) unless the
        journal holds entries (an outage the gateway was killed in) or, with
        ``start_degraded``, the failure is `transient` (Redis down): then it starts degraded and
        replays them once Redis answers. Once Redis answers: its epoch is read (and watched
        every ``epoch_check_s``) and an evicting ``maxmemory-policy`` is warned about."""
        loop = asyncio.get_running_loop()
        for seq, kind, payload in await self.store.load():
            written: asyncio.Future[int] = loop.create_future()
            written.set_result(seq)
            self._push(Entry(kind, payload, written))
            # when it was journaled: ``at``; a settle journaled before edge28 has its ``now``
            at = payload.get("at", payload.get("now"))
            if isinstance(at, int | float) and (
                    self._inherited_at is None or at < self._inherited_at):
                self._inherited_at = float(at)
        try:
            async with self._deadline():  # in running time, as every other call
                ok = await self.remote.ping()
            await self._check_epoch(strict=True)  # PING allowed is not enough (an ACL)
        except _FAILURES as exc:
            if self.journal:
                log.error(
                    "admission store (Redis) unreachable at start-up with %d journaled updates "
                    "in %s: starting degraded, they are replayed once Redis answers",
                    len(self.journal), self.store.path,
                )
            elif self.start_degraded and transient(exc):
                log.error(
                    "admission store (Redis) unreachable at start-up (%s): starting degraded "
                    "as in an outage (budgets 503 until Redis answers; "
                    "admission.start_without_redis); if Redis is not down, check "
                    "admission.redis_url", _describe(exc),
                )
            else:
                raise
            self._failed(exc)
            self._epoch_watch = loop.create_task(self._watch_epoch())
            return True
        self._epoch_watch = loop.create_task(self._watch_epoch())
        if self.journal:
            log.warning("replaying %d admission updates journaled by an earlier process",
                        len(self.journal))
            self._ensure_reconciler()
        return bool(ok)

    async def close(self) -> None:
        for task in (self._epoch_check, self._epoch_watch):
            if (exc := await stop_task(task)) is not None:
                log.error("admission store (Redis): an epoch task had failed: %r", exc)
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
        if self.journal:  # one last try, so a clean stop after an outage loses nothing
            with contextlib.suppress(*_FAILURES):
                async with self._deadline():
                    await self.remote.ping()
                await self._replay()
        if self.journal:
            if self.store.durable:
                log.error(
                    "closing with %d admission updates not replayed to Redis (it is still "
                    "down); they stay journaled in %s for the next start",
                    len(self.journal), self.store.path,
                )
                await asyncio.gather(*(e.written for e in self.journal), return_exceptions=True)
            else:
                log.error(
                    "closing with %d admission updates not replayed to Redis (it is still "
                    "down); the journal is in memory, they are lost",
                    len(self.journal),
                )
        await self.store.close()
        await self.remote.close()


