"""Admission state behind one small interface: budget counters with leases, token buckets,
short-lived markers and counters, and usage totals.

Every operation that must be atomic across gateway replicas is one call here:

- `AdmissionStore.reserve` checks *all* of a request's budget counters and, only if every one has
  room (``spent + reserved + demand <= limit``), adds a lease of ``demand`` to each. Leases carry an
  expiry: a lease that is never settled (the gateway died) stops counting when it expires, so
  budgets are never left inconsistent by a crash.
- `AdmissionStore.settle` removes a lease (if it has not expired) and adds the actual spend.
- `AdmissionStore.take` takes from several token buckets at once, or from none.

`MemoryStore` is the default (one process: asyncio makes each call atomic). `RedisStore`
(``admission.redis_state``) runs the same operations as Lua scripts for several replicas. Times
are wall-clock seconds passed in by the caller, so tests drive them with a fake clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

SEP = "\x1f"  # joins the parts of a usage group
OTHER_WORKFLOW = "(other)"
"""The workflow a tenant's usage counts beyond ``admission.usage_max_workflows`` distinct ones
a day (the x-inferplane-workflow header cannot spell it: no parentheses)."""


@dataclass(frozen=True, slots=True)
class StoreHealth:
    """What a store that can be out of service says of itself (``health()``, read when
    ``/metrics`` is): ``up`` (it takes writes), since when it has not (``down_for_s``) and the
    updates it keeps meanwhile (budget settles, usage rows). Its running totals (``outages``,
    ``dropped``) are the store's attributes, read as counters (`core.plane.Core`)."""

    up: bool
    down_for_s: float
    pending_settles: int
    pending_usage: int


IN_MEMORY = StoreHealth(up=True, down_for_s=0.0, pending_settles=0, pending_usage=0)
"""What a store in memory says (it has no ``health()``): always up, nothing waiting."""


@dataclass(frozen=True, slots=True)
class CounterDemand:
    """One budget counter touched by a request: its limits and what the request asks of it."""

    key: str
    limit_usd: float | None
    limit_tokens: int | None
    usd: float
    tokens: int
    ttl_s: float  # the counter's lifetime (its window plus a margin)


@dataclass(frozen=True, slots=True)
class CounterState:
    spent_usd: float = 0.0
    spent_tokens: int = 0
    reserved_usd: float = 0.0
    reserved_tokens: int = 0


@dataclass(frozen=True, slots=True)
class BucketDemand:
    """A token bucket of ``capacity`` refilled at ``rate_per_s``; the request takes ``cost``."""

    key: str
    capacity: float
    rate_per_s: float
    cost: float


@dataclass(frozen=True, slots=True)
class UsageRow:
    group: tuple[str, ...]
    usd: float
    prompt_tokens: int
    completion_tokens: int
    requests: int


class AdmissionStore(Protocol):
    async def reserve(
        self, counters: Sequence[CounterDemand], lease_id: str, expires_at: float, now: float
    ) -> int:
        """Reserve on all counters or none; -1 on success, else the index of a full counter."""

    async def settle(
        self,
        counters: Sequence[CounterDemand],
        lease_id: str,
        usd: float,
        tokens: int,
        now: float,
    ) -> None:
        """Drop the lease (if still live) and add the actual spend to every counter."""

    async def counter(self, key: str, now: float) -> CounterState:
        """A counter's totals (live leases only)."""

    async def take(self, buckets: Sequence[BucketDemand], now: float) -> float:
        """Take ``cost`` from every bucket, or from none; 0 on success, else seconds to wait."""

    async def marked(self, key: str, now: float) -> bool:
        """Whether ``key`` is remembered (`mark`, not expired)."""

    async def mark(self, key: str, ttl_s: float, now: float) -> None:
        """Remember ``key`` for ``ttl_s`` from ``now`` (again: the time starts over)."""

    async def unmark(self, key: str) -> None:
        """Forget ``key``."""

    async def incr(self, key: str, ttl_s: float, now: float) -> int:
        """Add one to a counter that lives ``ttl_s`` from its first increment; the new value."""

    async def add_usage(
        self,
        tenant: str,
        group: Sequence[str],
        usd: float,
        prompt: int,
        completion: int,
        settle_id: str | None = None,
    ) -> None:
        """Add one request's spend to the tenant's usage. A store that can see the same
        update twice (Redis: a journaled update replayed after an outage) applies a
        ``settle_id`` once; ``settle`` does the same with its ``lease_id``."""

    async def usage(self, tenant: str) -> list[UsageRow]: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class _Counter:
    expires_at: float
    spent_usd: float = 0.0
    spent_tokens: int = 0
    reserved_usd: float = 0.0
    reserved_tokens: int = 0
    leases: dict[str, tuple[float, int, float]] = field(default_factory=dict)

    def purge(self, now: float) -> None:
        dead = [lid for lid, (_, _, exp) in self.leases.items() if exp <= now]
        for lid in dead:
            usd, tok, _ = self.leases.pop(lid)
            self.reserved_usd -= usd
            self.reserved_tokens -= tok


class WorkflowCap:
    """``admission.usage_max_workflows`` for the stores of one process (memory, SQLite), as
    `RedisStore`'s script applies it: the first ``limit`` distinct workflow ids of a tenant's
    UTC day keep their own usage rows, a further id's usage that day counts under
    `OTHER_WORKFLOW` (a group without a workflow is never capped). The ids of a tenant's two
    latest days are kept (Redis keeps each day's set two days); ``limit`` None: no cap."""

    DAYS = 2

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._days: dict[str, dict[str, set[str]]] = {}  # tenant -> day -> workflow ids
        self._seeded: set[tuple[str, str]] = set()

    def applies(self, group: Sequence[str]) -> bool:
        """Whether ``group`` (day, workflow, ...) is subject to the cap."""
        return self.limit is not None and len(group) > 1 and bool(group[1])

    def seeded(self, tenant: str, day: str) -> bool:
        return (tenant, day) in self._seeded

    def dropped(self, tenant: str, day: str) -> bool:
        """Whether ``day`` is older than the `DAYS` days kept for ``tenant`` (a late update):
        its ids would be dropped at once, so seeding it from a file is wasted work."""
        days = self._days.get(tenant, {})
        return day not in days and len(days) >= self.DAYS and day < min(days)

    def seed(self, tenant: str, day: str, workflows: Iterable[str]) -> None:
        """The ids a tenant's day already has in a store's file (read once per day). A day
        older than the `DAYS` kept (a late update of a day already dropped) is not kept, so
        not marked seeded either: marked, it would read as seeded with its ids gone, and
        stay in ``_seeded`` for good."""
        ids = self._ids(tenant, day)
        if self._days.get(tenant, {}).get(day) is not ids:
            return  # dropped at once: older than the days kept
        ids.update(w for w in workflows if w and w != OTHER_WORKFLOW)
        self._seeded.add((tenant, day))

    def group(self, tenant: str, group: Sequence[str]) -> tuple[str, ...]:
        """``group`` as the usage counts it: its own, or with `OTHER_WORKFLOW` past the cap."""
        if not self.applies(group):
            return tuple(group)
        day, workflow = group[0], group[1]
        ids = self._ids(tenant, day)
        if workflow not in ids:
            assert self.limit is not None
            if len(ids) >= self.limit:
                return (day, OTHER_WORKFLOW, *group[2:])
            ids.add(workflow)
        return tuple(group)

    def _ids(self, tenant: str, day: str) -> set[str]:
        days = self._days.setdefault(tenant, {})
        ids = days.get(day)
        if ids is None:
            ids = days[day] = set()
            while len(days) > self.DAYS:  # ISO days sort as dates
                old = min(days)
                del days[old]
                self._seeded.discard((tenant, old))
        return ids


class MemoryStore:
    """The single-process store. Each method runs without awaiting, hence atomically.

    Keep `settle` and `add_usage` synchronous in effect: `Admission.finish_soon` runs the settle
    on this store eagerly, in the caller's task or in no task at all (the EPP's orphan check is
    a loop callback), so they must never await anything that suspends nor enter an
    ``asyncio.timeout``."""

    def __init__(self, *, max_workflows: int | None = None) -> None:
        self.workflows = WorkflowCap(max_workflows)  # admission.usage_max_workflows
        self._counters: dict[str, _Counter] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (level, at)
        self._marks: dict[str, float] = {}  # key -> expiry
        self._incrs: dict[str, tuple[int, float]] = {}
        self._usage: dict[str, dict[tuple[str, ...], list[float]]] = {}
        self._ops = 0

    def _counter(self, key: str, ttl_s: float, now: float) -> _Counter:
        c = self._counters.get(key)
        if c is None or c.expires_at <= now:
            c = self._counters[key] = _Counter(expires_at=now + ttl_s)
        c.purge(now)
        return c

    def _sweep(self, now: float) -> None:
        self._ops += 1
        if self._ops % 4096:
            return
        for d in (self._marks,):
            for k in [k for k, exp in d.items() if exp <= now]:
                del d[k]
        for k in [k for k, c in self._counters.items() if c.expires_at <= now]:
            del self._counters[k]
        for k in [k for k, (_, exp) in self._incrs.items() if exp <= now]:
            del self._incrs[k]

    async def reserve(
        self, counters: Sequence[CounterDemand], lease_id: str, expires_at: float, now: float
    ) -> int:
        self._sweep(now)
        live = [self._counter(d.key, d.ttl_s, now) for d in counters]
        for i, (d, c) in enumerate(zip(counters, live, strict=True)):
            if d.limit_usd is not None and c.spent_usd + c.reserved_usd + d.usd > d.limit_usd:
                return i
            if (
                d.limit_tokens is not None
                and c.spent_tokens + c.reserved_tokens + d.tokens > d.limit_tokens
            ):
                return i
        for d, c in zip(counters, live, strict=True):
            c.leases[lease_id] = (d.usd, d.tokens, expires_at)
            c.reserved_usd += d.usd
            c.reserved_tokens += d.tokens
        return -1

    async def settle(
        self,
        counters: Sequence[CounterDemand],
        lease_id: str,
        usd: float,
        tokens: int,
        now: float,
    ) -> None:
        for d in counters:
            c = self._counter(d.key, d.ttl_s, now)
            lease = c.leases.pop(lease_id, None)
            if lease is not None:
                c.reserved_usd -= lease[0]
                c.reserved_tokens -= lease[1]
            c.spent_usd += usd
            c.spent_tokens += tokens

    async def counter(self, key: str, now: float) -> CounterState:
        c = self._counters.get(key)
        if c is None or c.expires_at <= now:
            return CounterState()
        c.purge(now)
        return CounterState(c.spent_usd, c.spent_tokens, c.reserved_usd, c.reserved_tokens)

    async def take(self, buckets: Sequence[BucketDemand], now: float) -> float:
        levels: list[float] = []
        wait = 0.0
        for b in buckets:
            level, at = self._buckets.get(b.key, (b.capacity, now))
            level = min(b.capacity, level + max(0.0, now - at) * b.rate_per_s)
            levels.append(level)
            if level < b.cost:
                wait = max(wait, (b.cost - level) / b.rate_per_s if b.rate_per_s > 0 else 60.0)
        if wait > 0:
            return wait
        for b, level in zip(buckets, levels, strict=True):
            self._buckets[b.key] = (level - b.cost, now)
        return 0.0

    async def marked(self, key: str, now: float) -> bool:
        self._sweep(now)  # once per admitted request: what keeps the expired entries bounded
        exp = self._marks.get(key)
        return exp is not None and exp > now

    async def mark(self, key: str, ttl_s: float, now: float) -> None:
        self._sweep(now)
        self._marks[key] = now + ttl_s

    async def unmark(self, key: str) -> None:
        self._marks.pop(key, None)

    async def incr(self, key: str, ttl_s: float, now: float) -> int:
        n, exp = self._incrs.get(key, (0, now + ttl_s))
        if exp <= now:
            n, exp = 0, now + ttl_s
        self._incrs[key] = (n + 1, exp)
        return n + 1

    async def add_usage(
        self,
        tenant: str,
        group: Sequence[str],
        usd: float,
        prompt: int,
        completion: int,
        settle_id: str | None = None,
    ) -> None:
        # one process, each update applied once as it is made: no repeats to see
        group = self.workflows.group(tenant, group)
        row = self._usage.setdefault(tenant, {}).setdefault(group, [0.0, 0, 0, 0])
        row[0] += usd
        row[1] += prompt
        row[2] += completion
        row[3] += 1

    async def usage(self, tenant: str) -> list[UsageRow]:
        return [
            UsageRow(g, v[0], int(v[1]), int(v[2]), int(v[3]))
            for g, v in self._usage.get(tenant, {}).items()
        ]

    async def close(self) -> None:
        return None
