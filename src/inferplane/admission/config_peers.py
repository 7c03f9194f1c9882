"""`ConfigPeers`: which fleet file each process sharing one Redis runs (edge28 item 4).

Replicas that share budgets, slots and placement state through Redis can still run different
fleet files after a partial rollout or a reload that reached only some of them: different
budgets against one shared counter, different endpoints. With ``admission.store: redis`` every
process (each gateway replica, each ``serve --workers`` worker, each picker) writes the SHA-256
of its running fleet file into the hash ``<prefix>cfg`` (field: the process's id, value:
``<sha256> <expiry in Redis milliseconds>``) every ``interval_s`` and at once after a reload,
and reads back every live entry in the same script. An entry whose expiry (``ttl_s`` after its
write, in Redis server time, so replicas' clocks do not matter) has passed is removed there: a
process that stopped drops out at once (it removes its own entry), one that was killed within
``ttl_s``.

What it tells: ``counts`` (live processes by fleet file hash, this one included) and
``disagree`` (more than one hash), read by the owner through ``on_seen`` (the gateway's
``inferplane_config_replicas{sha256}`` and ``inferplane_config_replicas_disagree``); one
WARNING when the processes start to disagree or the set of hashes changes while they do, one
when they agree again.

Redis unreachable: nothing is published or read, the last reading stays and ``stale`` is true
(``on_stale``: ``inferplane_config_replicas_stale``) until a publish succeeds again; a failure
Redis being down or restarting gives is logged at DEBUG (the admission store's own gauges say
Redis is down), any other (an ACL that refuses the script's commands) as a rate-limited
WARNING. A process whose front end
never names its fleet file (an in-process gateway, a test) publishes and reads nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Mapping

from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError

from inferplane.admission.outage import transient
from inferplane.admission.redis_state import fail_fast_client
from inferplane.lograte import LogLimiter
from inferplane.looplag import MAX_STRETCH, LoopLag, bounded
from inferplane.waits import stop_task

log = logging.getLogger("inferplane.config")

_FAILURES = (RedisError, OSError, asyncio.TimeoutError)

PUBLISH_S = 15.0
"""How often each process writes its entry and reads the others'."""
TTL_S = 3 * PUBLISH_S
"""How long an entry counts after its write: a killed process drops out within this."""

# KEYS[1] the hash; ARGV[1] this process's id, ARGV[2] its hash ('' : publish nothing, read
# only), ARGV[3] the entry's lifetime (ms). Returns id, hash, id, hash... of the live entries.
PUBLISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. string.format('%.0f', now + ttl))
end
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  local sha, exp = string.match(all[i + 1], '^(%S+) (%d+)$')
  if exp == nil or tonumber(exp) < now then
    redis.call('HDEL', KEYS[1], all[i])
  else
    out[#out + 1] = all[i]
    out[#out + 1] = sha
  end
end
if #out > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return out
"""


def short(sha256: str) -> str:
    return sha256[:12]


class ConfigPeers:
    """One process's side of the comparison (module docstring)."""

    def __init__(
        self,
        url: str,
        prefix: str,
        *,
        on_seen: Callable[[Mapping[str, int]], None] = lambda counts: None,
        on_stale: Callable[[bool], None] = lambda stale: None,
        interval_s: float = PUBLISH_S,
        ttl_s: float = TTL_S,
        timeout_s: float = 0.5,
        lag: LoopLag | None = None,
        max_stretch: float = MAX_STRETCH,
    ) -> None:
        self.r = fail_fast_client(url, timeout_s * (max_stretch if lag is not None else 1.0))
        self.key = f"{prefix}cfg"
        self.me = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.on_seen = on_seen
        self.on_stale = on_stale
        self.stale = False  # the last publish failed: ``counts`` is an older reading
        self._limiter = LogLimiter(log)
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.lag = lag
        self.max_stretch = max_stretch
        self.sha256: str | None = None  # this process's running fleet file's
        self.counts: dict[str, int] = {}  # live processes by fleet file hash, as last read
        self.published = False  # this process's entry was written (removed again at close)
        self._script = self.r.register_script(PUBLISH)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def disagree(self) -> bool:
        return len(self.counts) > 1

    def set_sha256(self, sha256: str | None) -> None:
        """This process now runs the fleet file ``sha256`` (start-up, a reload): published at
        once by the running loop."""
        if sha256 != self.sha256:
            self.sha256 = sha256
            self._wake.set()

    async def publish(self) -> dict[str, int]:
        """Write this process's entry (when its hash is known) and read every live one; returns
        and keeps ``counts``. Raises what Redis raises."""
        async with bounded(self.lag, self.timeout_s, self.max_stretch):
            raw = await self._script(
                keys=[self.key], args=[self.me, self.sha256 or "", round(self.ttl_s * 1000)]
            )
        self.published = self.published or self.sha256 is not None
        counts: dict[str, int] = {}
        for sha in raw[1::2]:
            sha = sha.decode() if isinstance(sha, bytes) else str(sha)
            counts[sha] = counts.get(sha, 0) + 1
        self._seen(counts)
        return counts

    def _set_stale(self, stale: bool) -> None:
        if stale != self.stale:
            self.stale = stale
            self.on_stale(stale)

    def _failed(self, exc: BaseException) -> None:
        """A publish failed: Redis down or restarting (``transient``) is DEBUG, the admission
        store's gauges say so; anything else (an ACL without ``HGETALL``, a script Redis
        refuses) would leave the comparison off for good: one WARNING per ``LogLimiter``
        interval. Either way the reading is stale until a publish succeeds again."""
        self._set_stale(True)
        dropped = isinstance(exc, RedisConnectionError) and not isinstance(
            exc, AuthenticationError)  # a connection a restarting Redis closed
        if transient(exc) or dropped:
            log.debug("fleet configuration: publishing to Redis failed: %r", exc)
        else:
            self._limiter.warn(
                "config-peers", "fleet configuration: comparing fleet files through Redis "
                "failed, inferplane_config_replicas* keep their last reading "
                "(inferplane_config_replicas_stale 1): %r", exc)

    def _seen(self, counts: dict[str, int]) -> None:
        self._set_stale(False)
        before, self.counts = self.counts, counts
        self.on_seen(counts)
        if len(counts) > 1 and set(counts) != set(before):
            mine = self.sha256
            log.warning(
                "fleet configuration: the %d processes sharing this Redis run %d different "
                "fleet files: %s (a partial rollout, or a reload that did not reach every "
                "replica: budgets and limits differ between them)",
                sum(counts.values()), len(counts),
                ", ".join(f"{short(s)}… ×{n}{' (this one)' if s == mine else ''}"
                          for s, n in sorted(counts.items(), key=lambda kv: -kv[1])),
            )
        elif len(counts) == 1 and len(before) > 1:
            (sha, n), = counts.items()
            log.warning("fleet configuration: the %d processes sharing this Redis run one "
                        "fleet file again (%s…)", n, short(sha))

    async def _run(self) -> None:
        while True:
            if self.sha256 is None:  # nothing to publish until the front end names its file
                await self._wake.wait()
            # cleared before the publish: a reload during it wakes the next one at once
            self._wake.clear()
            try:
                await self.publish()
            except _FAILURES as exc:
                self._failed(exc)
            except Exception:  # a bug here must not stop the comparison for good
                self._set_stale(True)
                log.exception("fleet configuration: publishing to Redis failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop publishing and remove this process's entry (best effort: it expires anyway).
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        if (exc := await stop_task(self._task)) is not None:
            log.error("fleet configuration: the publisher had failed: %r", exc)
        self._task = None
        if self.published:
            with contextlib.suppress(*_FAILURES):
                async with bounded(self.lag, self.timeout_s, self.max_stretch):
                    await self.r.hdel(self.key, self.me)
        await self.r.aclose()
