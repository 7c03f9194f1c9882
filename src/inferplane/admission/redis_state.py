"""`RedisStore`: the admission store shared by several gateway replicas.

Reserve, settle and bucket-take are each one Lua script, so they are atomic in Redis whatever
the interleaving of replicas. Layout under the configured prefix ``P``:

- ``P c:<counter>`` hash ``su st ru rt`` (spent / reserved nano-USD and tokens, integers so
  that sums are exact) and ``lu:<lease>``
  ``lt:<lease>`` per live lease; ``P z:<counter>`` sorted set of lease ids by expiry. Expired
  leases are purged (their reservation given back) by the next script that touches the counter.
- ``P b:<bucket>`` hash ``l t`` (level, time of level).
- ``P m:<key>`` markers (``SET NX PX``), ``P i:<key>`` counters, ``P u:<tenant>`` usage hash.
- ``P a:s:<lease>``, ``P a:u:<id>``: settle ids applied (``admission.settle_id_ttl_s``).
- ``P w:<tenant>:<day>`` set of the workflow ids in the tenant's usage that day (at most
  ``admission.usage_max_workflows``; the others are counted as ``(other)``), kept two days.
- ``P epoch``: a random value written once (no expiry); a process that finds it missing or
  changed after an outage knows Redis lost its data (`RedisStore.epoch`).

Keys of one call are not hash-tagged together: this targets one Redis (or a primary), not Redis
Cluster.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from inferplane.admission.state import (
    OTHER_WORKFLOW,
    SEP,
    BucketDemand,
    CounterDemand,
    CounterState,
    UsageRow,
)

NANO = 1e9
# How long Redis remembers a settle's id (``a:s:<lease>``, ``a:u:<ticket>``) by default
# (``admission.settle_id_ttl_s``): longer than a settle normally waits in the outage journal
# (`admission.outage`), which replays within seconds of Redis answering again, or at the next
# start of a gateway killed during the outage (a journal replayed later than this after the
# settle reached Redis could count an entry twice). Until 2026-12-07 one day.
APPLIED_TTL_S = 3600.0
WORKFLOW_SET_TTL_S = 2 * 86400.0

_PURGE = """
local function purge(h, z, now)
  local dead = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  for _, id in ipairs(dead) do
    local u = tonumber(redis.call('HGET', h, 'lu:' .. id) or '0')
    local t = tonumber(redis.call('HGET', h, 'lt:' .. id) or '0')
    redis.call('HINCRBY', h, 'ru', 0 - u)
    redis.call('HINCRBY', h, 'rt', 0 - t)
    redis.call('HDEL', h, 'lu:' .. id, 'lt:' .. id)
  end
  if #dead > 0 then redis.call('ZREMRANGEBYSCORE', z, '-inf', now) end
end
"""

RESERVE = (
    _PURGE
    + """
local now, exp, lid = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local n = #KEYS / 2
for i = 1, n do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  purge(h, z, now)
  local b = 3 + (i - 1) * 5
  local lu, lt = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local du, dt = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local v = redis.call('HMGET', h, 'su', 'st', 'ru', 'rt')
  local su, st = tonumber(v[1] or '0'), tonumber(v[2] or '0')
  local ru, rt = tonumber(v[3] or '0'), tonumber(v[4] or '0')
  if lu >= 0 and su + ru + du > lu then return i - 1 end
  if lt >= 0 and st + rt + dt > lt then return i - 1 end
end
for i = 1, n do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  local b = 3 + (i - 1) * 5
  local du, dt, ttl = ARGV[b + 3], ARGV[b + 4], ARGV[b + 5]
  redis.call('HINCRBY', h, 'ru', du)
  redis.call('HINCRBY', h, 'rt', dt)
  redis.call('HSET', h, 'lu:' .. lid, du, 'lt:' .. lid, dt)
  redis.call('ZADD', z, exp, lid)
  redis.call('PEXPIRE', h, ttl)
  redis.call('PEXPIRE', z, ttl)
end
return -1
"""
)

# KEYS: the counters' (hash, lease zset) pairs, then the settle's applied-id key. A settle
# whose id was already applied does nothing: a settle journaled during an outage (it timed
# out) and replayed may also have run in Redis when Redis resumed, and must count once.
SETTLE = """
local lid, usd, tok = ARGV[1], ARGV[2], ARGV[3]
local n = #KEYS - 1
if not redis.call('SET', KEYS[n + 1], '1', 'NX', 'PX', ARGV[4 + n / 2]) then return 1 end
for i = 1, n / 2 do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  if redis.call('ZREM', z, lid) == 1 then
    local u = tonumber(redis.call('HGET', h, 'lu:' .. lid) or '0')
    local t = tonumber(redis.call('HGET', h, 'lt:' .. lid) or '0')
    redis.call('HINCRBY', h, 'ru', 0 - u)
    redis.call('HINCRBY', h, 'rt', 0 - t)
    redis.call('HDEL', h, 'lu:' .. lid, 'lt:' .. lid)
  end
  redis.call('HINCRBY', h, 'su', usd)
  redis.call('HINCRBY', h, 'st', tok)
  redis.call('PEXPIRE', h, ARGV[3 + i])
end
return 0
"""

# KEYS: the tenant's usage hash, the applied-id key (ARGV[6] the id's lifetime, ms), the
# tenant's workflow set of the day. ARGV[7] the workflow ('' none), ARGV[8] the cap (-1 none),
# ARGV[9] the group with the workflow '(other)', ARGV[10] the set's lifetime (ms)
ADD_USAGE = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[6]) then return 1 end
local g = ARGV[1]
local wf, cap = ARGV[7], tonumber(ARGV[8])
if wf ~= '' and cap >= 0 and redis.call('SISMEMBER', KEYS[3], wf) == 0 then
  if redis.call('SCARD', KEYS[3]) >= cap then
    g = ARGV[9]
  else
    redis.call('SADD', KEYS[3], wf)
    redis.call('PEXPIRE', KEYS[3], ARGV[10])
  end
end
redis.call('HINCRBYFLOAT', KEYS[1], g .. '\\30usd', ARGV[2])
redis.call('HINCRBY', KEYS[1], g .. '\\30p', ARGV[3])
redis.call('HINCRBY', KEYS[1], g .. '\\30c', ARGV[4])
redis.call('HINCRBY', KEYS[1], g .. '\\30n', ARGV[5])
return 0
"""

# KEYS: the epoch key; ARGV[1] a fresh value, written when the key is missing. Returns the
# key's value (the fresh one when it was missing)
EPOCH = """
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""

COUNTER = (
    _PURGE
    + """
purge(KEYS[1], KEYS[2], tonumber(ARGV[1]))
return redis.call('HMGET', KEYS[1], 'su', 'st', 'ru', 'rt')
"""
)

TAKE = """
local now = tonumber(ARGV[1])
local wait = 0
local levels = {}
for i = 1, #KEYS do
  local b = 1 + (i - 1) * 3
  local cap, rate, cost = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local v = redis.call('HMGET', KEYS[i], 'l', 't')
  local level, at = cap, now
  if v[1] then level, at = tonumber(v[1]), tonumber(v[2]) end
  local dt = now - at
  if dt < 0 then dt = 0 end
  level = math.min(cap, level + dt * rate)
  levels[i] = level
  if level < cost then
    local w = 60
    if rate > 0 then w = (cost - level) / rate end
    if w > wait then wait = w end
  end
end
if wait > 0 then return tostring(wait) end
for i = 1, #KEYS do
  local b = 1 + (i - 1) * 3
  local cap, rate, cost = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  redis.call('HSET', KEYS[i], 'l', tostring(levels[i] - cost), 't', tostring(now))
  local ttl = 60000
  if rate > 0 then ttl = math.ceil(cap / rate * 1000) + 1000 end
  redis.call('PEXPIRE', KEYS[i], ttl)
end
return '0'
"""


def _limit(v: float | int | None, scale: float = 1.0) -> str:
    return "-1" if v is None else str(round(v * scale))


def _nano(usd: float) -> str:
    return str(round(usd * NANO))


def _ms(seconds: float) -> str:
    return str(max(1, int(seconds * 1000)))


def fail_fast_client(url: str, timeout_s: float, *, decode_responses: bool = True,
                     read_timeout: bool = True) -> aioredis.Redis:
    """A client of the shared Redis for the gateway's own calls (admission, slots, shared
    placement): connecting and (with ``read_timeout``) each reply bounded by ``timeout_s``, and no
    retries inside the client, so that a dead Redis costs one short timeout and the caller
    decides what the failure means. Without ``read_timeout`` no ``socket_timeout`` is passed
    at all (redis-py's default, as the subscriber always had)."""
    kwargs: dict[str, Any] = {"socket_connect_timeout": timeout_s, "retry": Retry(NoBackoff(), 0)}
    if decode_responses:
        kwargs["decode_responses"] = True
    if read_timeout:
        kwargs["socket_timeout"] = timeout_s
    return aioredis.Redis.from_url(url, **kwargs)


class RedisStore:
    """`AdmissionStore` on Redis (``redis.asyncio``), atomic through Lua scripts."""

    def __init__(
        self,
        url: str,
        prefix: str = "inferplane:",
        timeout_s: float = 0.5,
        *,
        max_stretch: float = 1.0,
        settle_id_ttl_s: float = APPLIED_TTL_S,
        max_workflows: int | None = None,
    ) -> None:
        # a dead Redis must cost one short timeout, not a stalled request: no retries with
        # backoff inside the client (`admission.outage` decides what a failure means). The
        # client's own timeouts are ``max_stretch × timeout_s``: a caller that bounds each call
        # in the gateway's running time (`OutageStore` with a `LoopLag`) stretches it that far
        self.timeout_s = timeout_s
        self.r = fail_fast_client(url, timeout_s * max_stretch)
        self.p = prefix
        self.settle_id_ttl_s = settle_id_ttl_s
        self.max_workflows = max_workflows
        self._epoch = self.r.register_script(EPOCH)
        self._reserve = self.r.register_script(RESERVE)
        self._settle = self.r.register_script(SETTLE)
        self._counter = self.r.register_script(COUNTER)
        self._take = self.r.register_script(TAKE)
        self._add_usage = self.r.register_script(ADD_USAGE)

    def _keys(self, counters: Sequence[CounterDemand]) -> list[str]:
        return [k for d in counters for k in (f"{self.p}c:{d.key}", f"{self.p}z:{d.key}")]

    async def ping(self) -> bool:
        return bool(await self.r.ping())

    async def epoch(self, fresh: str) -> str:
        """The value of ``<prefix>epoch``, written as ``fresh`` when it is missing (a new Redis,
        or one that lost its data)."""
        return str(await self._epoch(keys=[f"{self.p}epoch"], args=[fresh]))

    async def memory_policy(self) -> tuple[int, str]:
        """(``maxmemory`` in bytes, ``maxmemory-policy``) from ``INFO memory``."""
        info: dict[str, Any] = await self.r.info("memory")
        return int(info.get("maxmemory", 0)), str(info.get("maxmemory_policy", ""))

    async def reserve(
        self, counters: Sequence[CounterDemand], lease_id: str, expires_at: float, now: float
    ) -> int:
        if not counters:
            return -1
        args: list[str] = [repr(now), repr(expires_at), lease_id]
        for d in counters:
            args += [
                _limit(d.limit_usd, NANO),
                _limit(d.limit_tokens),
                _nano(d.usd),
                str(d.tokens),
                _ms(d.ttl_s),
            ]
        return int(await self._reserve(keys=self._keys(counters), args=args))

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
        args = [lease_id, _nano(usd), str(tokens)] + [_ms(d.ttl_s) for d in counters]
        args.append(_ms(self.settle_id_ttl_s))
        keys = [*self._keys(counters), f"{self.p}a:s:{lease_id}"]
        await self._settle(keys=keys, args=args)

    async def counter(self, key: str, now: float) -> CounterState:
        v: list[Any] = await self._counter(
            keys=[f"{self.p}c:{key}", f"{self.p}z:{key}"], args=[repr(now)]
        )
        su, st, ru, rt = (x or "0" for x in v)
        return CounterState(int(su) / NANO, int(st), int(ru) / NANO, int(rt))

    async def take(self, buckets: Sequence[BucketDemand], now: float) -> float:
        if not buckets:
            return 0.0
        args = [repr(now)]
        for b in buckets:
            args += [repr(b.capacity), repr(b.rate_per_s), repr(b.cost)]
        return float(await self._take(keys=[f"{self.p}b:{b.key}" for b in buckets], args=args))

    async def marked(self, key: str, now: float) -> bool:
        return bool(await self.r.exists(f"{self.p}m:{key}"))

    async def mark(self, key: str, ttl_s: float, now: float) -> None:
        await self.r.set(f"{self.p}m:{key}", "1", px=int(_ms(ttl_s)))

    async def unmark(self, key: str) -> None:
        await self.r.delete(f"{self.p}m:{key}")

    async def incr(self, key: str, ttl_s: float, now: float) -> int:
        k = f"{self.p}i:{key}"
        n = int(await self.r.incr(k))
        if n == 1:
            await self.r.pexpire(k, int(_ms(ttl_s)))
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
        k = f"{self.p}u:{tenant}"
        g = SEP.join(group)
        # group: (day, workflow, model, class, key); applied once, however often it is sent (a
        # replay), by its id (one of its own when it has none)
        day, workflow = (group[0], group[1]) if len(group) > 1 else ("", "")
        other = SEP.join((day, OTHER_WORKFLOW, *group[2:]))
        cap = -1 if self.max_workflows is None else self.max_workflows
        await self._add_usage(
            keys=[k, f"{self.p}a:u:{settle_id or os.urandom(8).hex()}",
                  f"{self.p}w:{tenant}:{day}"],
            args=[g, repr(usd), str(prompt), str(completion), "1", _ms(self.settle_id_ttl_s),
                  workflow, str(cap), other, _ms(WORKFLOW_SET_TTL_S)],
        )

    async def usage(self, tenant: str) -> list[UsageRow]:
        raw = cast(dict[str, str], await self.r.hgetall(f"{self.p}u:{tenant}"))
        rows: dict[str, dict[str, str]] = {}
        for field, value in raw.items():
            g, _, what = field.rpartition("\x1e")
            rows.setdefault(g, {})[what] = value
        return [
            UsageRow(
                tuple(g.split(SEP)),
                float(v.get("usd", 0)),
                int(v.get("p", 0)),
                int(v.get("c", 0)),
                int(v.get("n", 0)),
            )
            for g, v in rows.items()
        ]

    async def close(self) -> None:
        await self.r.aclose()
