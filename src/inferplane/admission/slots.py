"""`SharedSlots`: per-endpoint in-flight slots held in Redis with leases, across replicas.

Every gateway replica (and every `serve --workers` process) that shares one Redis takes a slot
of the picked endpoint before it sends a request there, and gives it back when the request ends.
A slot is a member of the endpoint's sorted set ``<prefix>e:<endpoint>`` scored by its lease
expiry (Redis server time, so replicas' clocks do not matter):

- **acquire** is one Lua script: drop expired members, and add one only while fewer than the
  endpoint's ``max_concurrency`` are held. So ``max_concurrency`` holds for every priority across
  all replicas: a request that finds its pick full tries another endpoint or waits.
- **leases**: each process renews the slots it holds every ``lease_s / 3``; a process killed
  with -9 stops renewing and its slots expire within ``lease_s``. A live process that ran too
  late to renew in time (a loaded host) finds slots that had lapsed: the renewal puts them
  back, since their requests still run (the fleet-wide count is right again, and over the
  limit until they end), and says so (`lapsed`, a warning): meanwhile another replica may
  have taken them.
- **release** is a ``ZREM`` sent off the response path (batched).
- **sync**: every ``sync_s`` one script reads every endpoint's count; the other replicas' share
  (count − slots held here) is fed to `LiveFleet.set_remote_inflight`, so placement, the
  admission queue and pool health see the fleet-wide in-flight count.

When Redis is unreachable the slots fall back to this process's view: an endpoint is full when
the slots held here plus the other replicas' last known count reach ``max_concurrency`` (the
counts freeze at the outage's start). Slots taken during the outage are added to Redis by the
first renewal after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence

from redis.exceptions import RedisError

from inferplane.admission.redis_state import fail_fast_client
from inferplane.looplag import MAX_STRETCH, LoopLag, bounded
from inferplane.waits import stop_task

log = logging.getLogger("inferplane.admission")

_FAILURES = (RedisError, OSError, asyncio.TimeoutError)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

ACQUIRE = (
    _NOW
    + """
local key, limit, id, lease = KEYS[1], tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local n = redis.call('ZCARD', key)
if n >= limit then return -n end
redis.call('ZADD', key, now + lease, id)
redis.call('PEXPIRE', key, lease * 2)
return n + 1
"""
)

COUNTS = (
    _NOW
    + """
local out = {}
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  out[i] = redis.call('ZCARD', KEYS[i])
end
return out
"""
)

# ARGV: lease, then per key: its number of ids, the ids. Every id is (re)added with a new
# lease; returns the ids that had lapsed: expired, or already dropped, before this renewal
RENEW = (
    _NOW
    + """
local lease = tonumber(ARGV[1])
local a = 2
local lapsed = {}
for i = 1, #KEYS do
  local n = tonumber(ARGV[a])
  for j = 1, n do
    local id = ARGV[a + j]
    local score = redis.call('ZSCORE', KEYS[i], id)
    if not score or tonumber(score) <= now then
      lapsed[#lapsed + 1] = id
    end
    redis.call('ZADD', KEYS[i], now + lease, id)
  end
  redis.call('PEXPIRE', KEYS[i], lease * 2)
  a = a + n + 1
end
return lapsed
"""
)


class SharedSlots:
    """One process's side of the shared per-endpoint slots."""

    def __init__(
        self,
        url: str,
        prefix: str,
        *,
        limits: dict[str, int],
        on_remote: Callable[[str, int], None],
        lease_s: float = 10.0,
        sync_s: float = 0.05,
        timeout_s: float = 0.5,
        retry_after_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        lag: LoopLag | None = None,
        max_stretch: float = MAX_STRETCH,
    ) -> None:
        # each call is bounded by ``timeout_s`` of running time (`_deadline`); the client's own
        # timeouts only back that up, at its wall-time cap
        backstop = timeout_s * (max_stretch if lag is not None else 1.0)
        self.r = fail_fast_client(url, backstop)
        self.timeout_s = timeout_s
        self.lag = lag
        self.max_stretch = max_stretch
        self.p = prefix
        self.limits = dict(limits)
        self.on_remote = on_remote
        self.lease_ms = max(1, int(lease_s * 1000))
        self.lease_s = lease_s
        self.sync_s = sync_s
        self.retry_after_s = retry_after_s
        self.clock = clock
        self.replica = f"{os.getpid()}-{os.urandom(4).hex()}"  # slot ids: "<replica>:<n>"
        self._ids = itertools.count()
        self.held: dict[str, set[str]] = {name: set() for name in limits}
        self.remote: dict[str, int] = dict.fromkeys(limits, 0)
        self._acquire = self.r.register_script(ACQUIRE)
        self._counts = self.r.register_script(COUNTS)
        self._renew = self.r.register_script(RENEW)
        self._releases: list[tuple[str, str]] = []
        self._flush: asyncio.Task[None] | None = None
        self._loop: asyncio.Task[None] | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.down_since: float | None = None
        self._retry_at = 0.0
        self._readd = False  # after an outage: put back the slots taken while Redis was down
        self.refused = 0
        self.lapsed = 0  # slots found expired at their renewal (`renew`)

    # -- keys and state -------------------------------------------------------------------
    def _key(self, endpoint: str) -> str:
        return f"{self.p}e:{endpoint}"

    def set_limits(self, limits: dict[str, int]) -> None:
        """The fleet changed (a reload): new endpoints start empty; slots still held on a
        removed endpoint are kept until released."""
        self.limits = dict(limits)
        for name in limits:
            self.held.setdefault(name, set())
            self.remote.setdefault(name, 0)

    def _set_remote(self, endpoint: str, n: int) -> None:
        n = max(0, n)
        if self.remote.get(endpoint) != n:
            freed = n < self.remote.get(endpoint, 0)
            self.remote[endpoint] = n
            self.on_remote(endpoint, n)
            if freed:
                self._wake(len(self._waiters))

    def _failed(self, exc: BaseException) -> None:
        now = self.clock()
        self._retry_at = now + self.retry_after_s
        if self.down_since is None:
            self.down_since = now
            self._readd = True
            log.error(
                "shared in-flight slots: Redis unreachable (%s: %s); each endpoint's "
                "max_concurrency is enforced from this process's view until it returns",
                type(exc).__name__, exc,
            )

    def _deadline(self) -> contextlib.AbstractAsyncContextManager[object]:
        """One Redis call's deadline: ``timeout_s`` of the process's running time, at most
        ``max_stretch ×`` that of wall time (`inferplane.looplag.bounded`): a slot call that
        Redis answered in time is not an outage because this process's loop ran late (an
        outage here lets the other replicas' view lose this one's slots)."""
        return bounded(self.lag, self.timeout_s, self.max_stretch)

    def _up(self) -> None:
        if self.down_since is not None:
            log.warning("shared in-flight slots: Redis reachable again")
            self.down_since = None

    # -- acquire / release ----------------------------------------------------------------
    async def acquire(self, endpoint: str) -> str | None:
        """A slot id on ``endpoint``, or None when it is at ``max_concurrency`` fleet-wide."""
        limit = self.limits.get(endpoint)
        if limit is None:
            return None
        sid = f"{self.replica}:{next(self._ids)}"
        held = self.held.setdefault(endpoint, set())
        if self.down_since is None or self.clock() >= self._retry_at:
            try:
                async with self._deadline():
                    n = int(await self._acquire(
                        keys=[self._key(endpoint)], args=[limit, sid, self.lease_ms]
                    ))
            except _FAILURES as exc:
                self._failed(exc)
            else:
                self._up()
                if n > 0:
                    held.add(sid)
                    self._set_remote(endpoint, n - len(held))
                    return sid
                self._set_remote(endpoint, -n - len(held))
                self.refused += 1
                return None
        if len(held) + self.remote.get(endpoint, 0) >= limit:
            self.refused += 1
            return None
        held.add(sid)
        return sid

    def release(self, endpoint: str, sid: str) -> None:
        """Give a slot back (idempotent); the ZREM goes out off the response path."""
        held = self.held.get(endpoint)
        if held is None or sid not in held:
            return
        held.discard(sid)
        self._releases.append((endpoint, sid))
        if self._flush is None or self._flush.done():
            self._flush = asyncio.get_running_loop().create_task(self._send_releases())
        self._wake(1)

    async def _send_releases(self) -> None:
        await asyncio.sleep(0)  # gather the releases of this loop iteration
        while self._releases:
            batch, self._releases = self._releases, []
            if self.down_since is not None and self.clock() < self._retry_at:
                return  # their leases expire in Redis on their own
            try:
                async with self._deadline(), self.r.pipeline(transaction=False) as pipe:
                    for endpoint, sid in batch:
                        pipe.zrem(self._key(endpoint), sid)
                    await pipe.execute()
            except _FAILURES as exc:
                self._failed(exc)
                return

    # -- waiting for a free slot ----------------------------------------------------------
    def _wake(self, n: int) -> None:
        while n > 0 and self._waiters:
            f = self._waiters.popleft()
            if not f.done():
                f.set_result(None)
                n -= 1

    async def wait_free(self, timeout: float) -> None:
        """Wait until a slot may have freed (a release here, or a lower count from the other
        replicas), at most ``timeout`` seconds."""
        f: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(f)
        try:
            async with asyncio.timeout(timeout):  # not wait_for: see inferplane.waits
                await f
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            if f.done() and not f.cancelled():
                self._wake(1)  # woken as it was cancelled: the wake goes to the next waiter
            raise
        finally:
            if not f.done():
                f.cancel()

    # -- background: sync counts, renew leases --------------------------------------------
    async def sync(self) -> None:
        """Read every endpoint's count once; the other replicas' share goes to `on_remote`."""
        names = list(self.limits)
        counts: Sequence[int] = await self._counts(keys=[self._key(n) for n in names])
        for name, n in zip(names, counts, strict=True):
            self._set_remote(name, int(n) - len(self.held.get(name, ())))

    async def renew(self) -> None:
        """Renew every slot held here, putting back those that had lapsed (after an outage:
        the slots taken meanwhile; otherwise this process ran too late, which is logged)."""
        keys: list[str] = []
        args: list[str | int] = [self.lease_ms]
        owner: dict[str, str] = {}
        for name, held in self.held.items():
            if held:
                keys.append(self._key(name))
                args += [len(held), *held]
                owner.update(dict.fromkeys(held, name))
        readd = self._readd
        lapsed: list[str] = list(await self._renew(keys=keys, args=args)) if keys else []
        self._readd = False
        # released while the renewal was on its way: the renewal may have put it back
        for sid in lapsed:
            if sid not in self.held.get(owner[sid], ()):
                self._releases.append((owner[sid], sid))
        if self._releases and (self._flush is None or self._flush.done()):
            self._flush = asyncio.get_running_loop().create_task(self._send_releases())
        if lapsed and not readd:  # after an outage they are expected
            self.lapsed += len(lapsed)
            log.warning(
                "shared in-flight slots: %d slot(s) held here had lapsed in Redis before their "
                "renewal (every %.2f s, lease %.2f s): this process ran late, and meanwhile "
                "other replicas may have taken them (max_concurrency exceeded); put back",
                len(lapsed), max(self.sync_s, self.lease_s / 3.0), self.lease_s,
            )

    async def _run(self) -> None:
        renew_every = max(self.sync_s, self.lease_s / 3.0)
        next_renew = self.clock()
        while True:
            await asyncio.sleep(self.sync_s)
            if self.down_since is not None and self.clock() < self._retry_at:
                continue
            try:
                if self._readd or self.clock() >= next_renew:
                    async with self._deadline():
                        await self.renew()
                    next_renew = self.clock() + renew_every
                async with self._deadline():
                    await self.sync()
            except _FAILURES as exc:
                self._failed(exc)
                continue
            except Exception:  # a bug here must not stop the renewals
                log.exception("shared in-flight slots: sync failed")
                continue
            self._up()

    async def start(self, degraded: Callable[[BaseException], bool] | None = None) -> None:
        """Read the counts and start the background loop. Redis must answer, unless
        ``degraded`` says its failure is one to start through (the admission store started in
        an outage it was killed in): then the slots start from this process's view, as during
        any outage."""
        try:
            async with self._deadline():  # in running time, as every other call
                await self.r.ping()
            async with self._deadline():
                await self.sync()
        except _FAILURES as exc:
            if degraded is None or not degraded(exc):
                raise
            self._failed(exc)
        self._loop = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        for task in (self._loop, self._flush):
            if (exc := await stop_task(task)) is not None:  # cancelled again if it ran on
                log.error("shared in-flight slots: a background task had failed: %r", exc)
        held = [(name, sid) for name, ids in self.held.items() for sid in ids]
        self._releases += held
        for ids in self.held.values():
            ids.clear()
        with contextlib.suppress(*_FAILURES):
            if self._releases:
                async with self._deadline(), self.r.pipeline(transaction=False) as pipe:
                    for endpoint, sid in self._releases:
                        pipe.zrem(self._key(endpoint), sid)
                    await pipe.execute()
        self._releases = []
        await self.r.aclose()
