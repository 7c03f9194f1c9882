"""The admission stage: between classify and place, nothing is generated before it says yes.

`Admission.admit` runs, in order (cheapest and most local first; each step can refuse):

1. headers: ``x-inferplane-workflow``, ``Idempotency-Key`` (400 naming the header when bad);
2. token ceiling: ``max_tokens`` clamped (header ``x-inferplane-max-tokens-clamped: old->new``)
   or 400, by tenant policy; a body without ``max_tokens`` gets the class default, so the
   forwarded body always bounds generation (the body is re-serialized only then);
3. agent loop depth: the step header against ``loop.max_agent_step``, requests per workflow
   against ``loop.max_workflow_requests`` (400 ``agent_loop_depth_exceeded``); tool fan-out is
   exported;
4. client-retry recognition: a request is a retry when its ``Idempotency-Key`` (else its body
   from the same API key) was last seen failing within ``retry.window_s`` (refused here or
   later, an error answer, a timeout, its client gone: `Admission.finish` marks it; a
   success clears the mark), so a twin sent alongside (best-of-N) or after a success
   (Regenerate) is not one; under degradation (the request's pool saturated, or every endpoint
   of it at or over ``retry.degraded_error_rate``) retries are shed first (429 ``retry_shed``,
   jittered Retry-After); a shed does not mark again, so recognition ends ``window_s`` after
   the last real failure;
5. rate limits (token buckets, 429 + Retry-After);
6. budgets: the worst case reserved atomically on every applicable counter (429
   ``budget_exceeded`` with the window's reset);
7. priority queue while the pool is saturated, with per-tenant fair shares of the pool's slots
   (`admission.queue`).

The returned `Ticket` must be passed to `Admission.finish` exactly once (idempotent): it settles
the budget with the actual cost that `account` observed, gives back an unused queue slot,
corrects the tenant's fair-share counter and attributes the cost (usage store + metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import orjson

from inferplane import eagerly
from inferplane.admission import limits
from inferplane.admission.budget import BudgetLease, Budgets, WorstCase
from inferplane.admission.queue import BANDS, FairQueue, Grant, PoolKey
from inferplane.admission.retry import RetryBudget, retry_key
from inferplane.admission.state import AdmissionStore, MemoryStore
from inferplane.config.files import writable_file_problem
from inferplane.config.schema import FleetConfig, TenantSpec, WorkloadClass
from inferplane.errors import ConfigError, GatewayError, InvalidRequestError, RateLimitError
from inferplane.fleet.live import LiveFleet
from inferplane.fleet.model import Endpoint, Fleet
from inferplane.fleet.state import EndpointState, EndpointView, FleetSnapshot, SnapshotLog
from inferplane.looplag import LoopLag
from inferplane.placement.profile import RequestProfile
from inferplane.telemetry.metrics import GatewayMetrics
from inferplane.types import ApiKind

log = logging.getLogger("inferplane.admission")

_Pool = tuple[str, frozenset[str] | None, frozenset[str] | None]
# pools whose columns `Admission` keeps: the least recently used go beyond it (a fleet's pools
# are its models x the jurisdiction and kind sets its tenants ask for, a few dozen in practice)
_MAX_POOL_COLUMNS = 64
_REF_PREFILL_TOKENS = 2048  # prompt chunk at which the per-token prefill cost is taken


@dataclass(frozen=True, slots=True)
class _PoolStats:
    """One pool's endpoints as of one fleet snapshot (see `Admission._pool_stats`)."""

    usable: int  # usable endpoints
    capacity: int  # Σ max_concurrency
    free: int  # Σ requests each can take now (slots; with the dispatch gate at most 1 each)
    slot_free: int  # Σ free slots, whatever the gate says
    inflight: int
    lowest_error_rate: float
    room_capacity: int  # the most ``free`` can be: Σ max_concurrency, gated endpoints count 1
    gated: frozenset[str]  # endpoints whose prefill queue is past the gate now


class _PoolColumns:
    """One pool's members (positions in a fleet's snapshots) with each member's terms of the
    `_PoolStats` sums as of the view they were computed from: a new snapshot recomputes the
    terms of the views it replaced, and the sums are taken over the columns."""

    def __init__(self, fleet: Fleet, gate: float | None, members: list[int]) -> None:
        k = len(members)
        self.fleet, self.gate, self.members = fleet, gate, members
        self.some = len(members) != len(fleet.endpoints)  # else every position, in order
        self.views: list[EndpointView | None] = [None] * k
        self.usable, self.cap, self.free, self.slot_free = [0] * k, [0] * k, [0] * k, [0] * k
        self.inflight, self.room_cap = [0] * k, [0] * k
        self.err: list[float] = [math.inf] * k
        self.gated: set[str] = set()
        # usable, cap, free, slot_free, inflight and room_cap summed; the lowest error rate
        # (stale: to be taken again); the gated names as handed out
        self.totals = [0, 0, 0, 0, 0, 0]
        self.err_min = math.inf
        self.err_min_stale = False
        self.gated_frozen: frozenset[str] | None = None
        # the live fleet's snapshot log and the serial of the snapshot ``views`` hold (None: a
        # hand-built snapshot's, compared view by view), and each member position's index
        self.log: SnapshotLog | None = None
        self.serial = -1
        self.index = {i: j for j, i in enumerate(members)}

    def set(
        self, j: int, name: str, usable: int, cap: int, free: int, slot_free: int, inflight: int,
        err: float, room_cap: int, gated: bool,
    ) -> None:
        # the integer sums move by the member's change; the lowest error rate is taken again
        # (at `stats`) only when the member that may have held it rose
        t = self.totals
        t[0] += usable - self.usable[j]
        t[1] += cap - self.cap[j]
        t[2] += free - self.free[j]
        t[3] += slot_free - self.slot_free[j]
        t[4] += inflight - self.inflight[j]
        t[5] += room_cap - self.room_cap[j]
        old = self.err[j]
        if err < self.err_min:
            self.err_min = err
        elif err != old and old == self.err_min:
            self.err_min_stale = True
        self.usable[j], self.cap[j], self.free[j], self.slot_free[j] = usable, cap, free, slot_free
        self.inflight[j], self.err[j], self.room_cap[j] = inflight, err, room_cap
        if gated != (name in self.gated):
            if gated:
                self.gated.add(name)
            else:
                self.gated.discard(name)
            self.gated_frozen = None

    def stats(self) -> _PoolStats:
        """The sums over the members: kept as each member's terms change (`set`), equal to
        summing the columns (integers; the lowest error rate is the columns' min)."""
        if self.err_min_stale:
            self.err_min, self.err_min_stale = min(self.err, default=math.inf), False
        if self.gated_frozen is None:
            self.gated_frozen = frozenset(self.gated)
        t = self.totals
        return _PoolStats(t[0], t[1], t[2], t[3], t[4], self.err_min, t[5], self.gated_frozen)


@dataclass(slots=True)
class Ticket:
    """One admitted request: what admission changed and what it holds until `finish`."""

    tenant: str
    key_hash: str
    workflow: str | None
    workload_class: str
    profile: RequestProfile
    body: bytes | None = None  # the re-serialized body, when admission changed it
    headers: dict[str, str] = field(default_factory=dict)
    lease: BudgetLease | None = None
    grant: Grant | None = None
    usd: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    done: bool = False
    # client-retry recognition (`admission.retry`): the request's marker key, and whether its
    # answer was a success (`Core.account`); `finish` marks a failure, clears a success
    retry_key: str | None = None
    succeeded: bool = False
    # the settle's id: its budget lease and its usage update are applied once under it, even
    # when an outage journal replays them (`admission.outage`)
    settle_id: str = field(default_factory=lambda: os.urandom(8).hex())
    settling: asyncio.Future[None] | None = None  # `Admission.finish_soon`'s settle

    def observe(self, usd: float, prompt_tokens: int, completion_tokens: int) -> None:
        """The actual cost and tokens, from `account`."""
        self.usd = usd
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens


def make_store(
    config: FleetConfig, lag: LoopLag | None = None, file: str = "<config>"
) -> AdmissionStore:
    """The configured admission store. With Redis and ``lag`` (the process's `LoopLag`), each
    Redis call's timeout counts the gateway's running time, up to ``gateway.lag_max_stretch``
    × itself in wall time (`admission.outage`). A file of its own the gateway cannot create or
    write (its directory missing, ...: `store_problems`) is a `ConfigError` naming the field:
    a typo in ``admission.path`` must not start a new, empty budget store elsewhere."""
    spec = config.admission
    if problems := store_problems(config):
        raise ConfigError(file, problems)
    if spec.store == "redis":
        from inferplane.admission.journal import OutageJournal
        from inferplane.admission.outage import OutageStore
        from inferplane.admission.redis_state import RedisStore

        stretch = config.gateway.lag_max_stretch
        remote = RedisStore(spec.redis_url, spec.redis_prefix, spec.redis_timeout_s,
                            max_stretch=stretch if lag is not None else 1.0,
                            settle_id_ttl_s=spec.settle_id_ttl_s,
                            max_workflows=spec.usage_max_workflows)
        return OutageStore(
            remote,
            retry_after_s=spec.outage_retry_after_s,
            start_degraded=spec.start_without_redis,
            journal=OutageJournal(journal_path(config)),
            lag=lag,
            max_stretch=stretch,
        )
    path = local_store_path(config)
    if path is not None:
        from inferplane.admission.sqlite_state import SqliteStore

        return SqliteStore(path, retry_after_s=spec.outage_retry_after_s,
                           max_workflows=spec.usage_max_workflows)
    return MemoryStore(max_workflows=spec.usage_max_workflows)


def store_problems(config: FleetConfig) -> list[tuple[str, str]]:
    """What `make_store` would refuse, as (field, problem), without opening anything
    (`inferplane check` reports it): the local store's file (``admission.path``, default
    beside ``gateway.ledger_path``) or the Redis outage journal's (``admission.journal_path``,
    the same), where the gateway could not create or write it."""
    spec = config.admission
    if spec.store == "redis":
        path, own = journal_path(config), spec.journal_path
        key = "admission.journal_path" if own else "gateway.ledger_path"
    else:
        path, own = local_store_path(config), spec.path
        key = "admission.path" if own else "gateway.ledger_path"
    problem = None if path is None else writable_file_problem(path)
    return [] if problem is None else [(key, f"{path}: {problem}")]


def journal_path(config: FleetConfig) -> str | None:
    """The SQLite file of the Redis outage journal, or None (in memory)."""
    if config.admission.journal_path:
        return config.admission.journal_path
    ledger = config.gateway.ledger_path
    return f"{ledger}.admission-journal.sqlite" if ledger else None


def local_store_path(config: FleetConfig) -> str | None:
    """The SQLite file of the local admission store, or None (in memory)."""
    spec = config.admission
    if spec.store != "local":
        return None
    if spec.path:
        return spec.path
    ledger = config.gateway.ledger_path
    return f"{ledger}.admission.sqlite" if ledger else None


class Admission:
    """The admission stage of one gateway process."""

    def __init__(
        self,
        config: FleetConfig,
        live: LiveFleet,
        metrics: GatewayMetrics,
        *,
        store: AdmissionStore | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        lag: LoopLag | None = None,
    ) -> None:
        spec = config.admission
        self.spec = spec
        self.enabled = spec.enabled
        # The simulator sets this: its virtual clock reads an instant's earliest timer for every
        # timer due within the loop's clock resolution (1 ns), so an idle tick, though it grants
        # nothing, can fix the clock value an event beside it reads (see Admission._tick).
        self.tick_while_idle = False
        self.live = live
        self.metrics = metrics
        self.clock = clock
        self.rng = rng or random.Random(config.gateway.seed)
        self.store: AdmissionStore = store or make_store(config, lag)
        self.classes: dict[str, WorkloadClass] = {c.name: c for c in config.classes}
        longest_wait = max(
            [spec.queue.default_deadline_ms]
            + [c.queue_deadline_ms for c in config.classes if c.queue_deadline_ms is not None]
        )
        timeout = config.gateway.upstream_timeout_s
        # a request re-placed after a pre-byte failure may wait on up to 1 + max_replacements
        # upstreams in turn: its lease must outlive all of them
        attempts = 1 + config.gateway.max_replacements
        self.lease_ttl_s = timeout * attempts + longest_wait / 1000.0 + spec.lease_margin_s
        self.budgets = Budgets(self.store, self.lease_ttl_s)
        self.worst = WorstCase(live.fleet, spec, timeout)
        q = spec.queue
        self.queue = FairQueue(
            self.free_slots,
            capacity=self.capacity if q.fair_share else None,
            room_capacity=self.room_capacity if q.max_prefill_queue_s is not None else None,
            slot_room=self.slot_free if q.max_prefill_queue_s is not None else None,
            reserve_fraction=q.reserve_fraction,
            active_window_s=q.active_window_s,
            max_waiting=q.max_waiting,
            clock=monotonic,
            envelope=self.capacity,
            shed_above=q.shed_above_utilisation,
            keep_unused_shares=q.keep_unused_shares,
        )
        self.retry_budget = RetryBudget(spec.retry, monotonic)
        self._stats_snapshot: FleetSnapshot | None = None
        self._stats: dict[PoolKey, _PoolStats] = {}
        self._columns: dict[_Pool, _PoolColumns] = {}  # by `_columns_key`, oldest use first
        self._fleet_sets: tuple[Fleet, frozenset[str], frozenset[str]] | None = None
        self.gate_s = q.max_prefill_queue_s
        self._prefill_s_per_token: dict[tuple[str, str], float | None] = {}
        if self.gate_s is not None:
            live.on_prefilled = self._prefilled
        self._day: tuple[float, float, str] = (0.0, 0.0, "")
        self._tasks: set[asyncio.Future[None]] = set()
        self._ticker: asyncio.Task[None] | None = None

    def fleet_changed(self) -> None:
        """The live fleet was reloaded: worst-case prices are recomputed over its endpoints, and
        the dispatch gate's prefill costs (an endpoint reloaded under its name may have new
        hardware or models)."""
        self.worst = WorstCase(self.live.fleet, self.spec, self.worst.timeout)
        self._prefill_s_per_token.clear()
        self._columns.clear()  # frees the old fleet's; `_compute_stats` also checks the fleet

    # -- pools ----------------------------------------------------------------------------
    @staticmethod
    def pool_of(p: RequestProfile) -> PoolKey:
        return (p.model, p.allowed_jurisdictions, p.allowed_kinds)

    def _pool_stats(self, pool: PoolKey) -> _PoolStats:
        """The pool's usable endpoints summed (`_PoolStats`), computed once per fleet snapshot:
        one request asks several times (retry check, queue room, fair share) and so does every
        queue pump."""
        snap = self.live.snapshot()
        if snap is not self._stats_snapshot:
            self._stats_snapshot = snap
            self._stats.clear()
        stats = self._stats.get(pool)
        if stats is None:
            stats = self._stats[pool] = self._compute_stats(snap, cast(_Pool, pool))
        return stats

    def _compute_stats(self, snap: FleetSnapshot, pool: _Pool) -> _PoolStats:
        """The pool's sums over ``snap``. Each member's terms are kept (`_PoolColumns`) and
        recomputed only where the snapshot holds a new view of it: a reservation changes one
        endpoint, and the sums of a 2,000-endpoint pool were ~1.5 ms a request. Those views are
        found from the live fleet's snapshot log (`FleetSnapshot.log`) where it covers the
        snapshot last read, else by comparing every member's view; the sums are kept too."""
        key = self._columns_key(snap.fleet, pool)
        cols = self._columns.pop(key, None)  # re-inserted last: the dict runs oldest use first
        if cols is None or cols.fleet is not snap.fleet or cols.gate != self.gate_s:
            model, jur, kinds = key
            members = [
                i
                for i, v in enumerate(snap.endpoints)
                if model in v.endpoint.models
                and (jur is None or v.endpoint.jurisdiction in jur)
                and (kinds is None or v.endpoint.substrate.kind in kinds)
            ]
            cols = _PoolColumns(snap.fleet, self.gate_s, members)
        self._columns[key] = cols
        if len(self._columns) > _MAX_POOL_COLUMNS:
            del self._columns[next(iter(self._columns))]  # the least recently used
        seen = cols.views
        log = snap.log
        changed = (
            log.changed_between(cols.serial, snap.serial)
            if log is not None and log is cols.log
            else None
        )
        cols.log, cols.serial = log, snap.serial
        if changed is not None:  # the views the live fleet replaced since: no walk over all
            views, index = snap.endpoints, cols.index
            for i in changed:
                j = index.get(i)
                if j is not None and views[i] is not seen[j]:
                    v = seen[j] = views[i]
                    self._terms(cols, j, v.endpoint, v.state, key[0])
            return cols.stats()
        self._compare_all(cols, snap, key[0])
        return cols.stats()

    def _compare_all(self, cols: _PoolColumns, snap: FleetSnapshot, model: str) -> None:
        """Bring ``cols`` to ``snap`` by comparing every member's view with the one it last
        read: where the snapshot log cannot say which views changed (new columns, a hand-built
        snapshot, a reload, more snapshots since than the log holds)."""
        seen = cols.views
        now = [snap.endpoints[i] for i in cols.members] if cols.some else snap.endpoints
        for j in [j for j, (v, w) in enumerate(zip(now, seen, strict=True)) if v is not w]:
            v = seen[j] = now[j]
            self._terms(cols, j, v.endpoint, v.state, model)

    def _columns_key(self, fleet: Fleet, pool: _Pool) -> _Pool:
        """The pool's key in `_columns`, by the members it selects: the request's jurisdictions
        and kinds cut to those the fleet has (None when that is all of them), and a model no
        endpoint serves as ``""`` with no member. Clients choose the
        ``x-inferplane-jurisdictions`` strings; keyed by them, every distinct value kept a
        pool's columns (~100 KB at 2,000 endpoints) until the fleet was reloaded."""
        if self._fleet_sets is None or self._fleet_sets[0] is not fleet:
            self._fleet_sets = (
                fleet,
                frozenset(e.jurisdiction for e in fleet.endpoints),
                frozenset(str(e.substrate.kind) for e in fleet.endpoints),
            )
        model, jur, kind = pool
        if model not in fleet.models:
            return ("", frozenset(), frozenset())
        _, jurs, kinds = self._fleet_sets
        if jur is not None:
            jur = None if jur >= jurs else jur & jurs
        if kind is not None:
            kind = None if kind >= kinds else kind & kinds
        return (model, jur, kind)

    def _terms(
        self, cols: _PoolColumns, j: int, e: Endpoint, st: EndpointState, model: str
    ) -> None:
        """Member ``j``'s terms of the pool's sums (all zero when it is not usable)."""
        if not st.usable:
            cols.set(j, e.name, 0, 0, 0, 0, 0, math.inf, 0, False)
            return
        gate = self.gate_s
        room = e.max_concurrency - st.inflight
        if st.requests_left is not None:  # a declared rate limit is capacity too
            room = min(room, st.requests_left)
        if st.tokens_left is not None and st.tokens_left <= 0:
            room = 0
        room = max(0, room)
        slot_free = room
        per_tok = None if gate is None else self._per_token(e, model)
        gated = False
        if per_tok is None or gate is None:
            room_cap = e.max_concurrency
        else:
            room_cap = 1
            if st.pending_prefill > 0 and st.pending_prefill_tokens * per_tok >= gate:
                gated = True
                room = 0
            else:  # one grant at a time: its placement updates the pending prefill
                room = min(room, 1)
        cols.set(
            j, e.name, 1, e.max_concurrency, room, slot_free, st.inflight, st.error_rate,
            room_cap, gated,
        )

    def _per_token(self, e: Endpoint, model: str) -> float | None:
        """Prefill seconds per uncached prompt token of ``model`` on ``e`` (the roofline's cost
        of a 2,048-token prefill ÷ 2,048), or None without a physics model (never gated)."""
        key = (e.name, model)
        if key not in self._prefill_s_per_token:
            r = e.roofline(model)
            self._prefill_s_per_token[key] = (
                None if r is None else r.prefill_time_s(_REF_PREFILL_TOKENS) / _REF_PREFILL_TOKENS
            )
        return self._prefill_s_per_token[key]

    def free_slots(self, pool: PoolKey) -> int:
        """Requests the pool can take now: free concurrency slots, and with the dispatch gate
        (``queue.max_prefill_queue_s``) at most one per endpoint whose prefill queue is under
        it; unbounded when the pool has no usable endpoint (then placement answers 503 naming
        its filters)."""
        st = self._pool_stats(pool)
        return st.free if st.usable else 1 << 30

    def slot_free(self, pool: PoolKey) -> int:
        """Free concurrency slots of the pool, whatever the dispatch gate says."""
        st = self._pool_stats(pool)
        return st.slot_free if st.usable else 1 << 30

    def capacity(self, pool: PoolKey) -> int:
        """The pool's concurrency envelope: Σ max_concurrency of its usable endpoints."""
        return self._pool_stats(pool).capacity

    def room_capacity(self, pool: PoolKey) -> int:
        """The most requests the pool can take at one instant (`free_slots` at its largest):
        the envelope, with each endpoint under the dispatch gate counting one."""
        return self._pool_stats(pool).room_capacity

    def gated(self, p: RequestProfile) -> frozenset[str]:
        """Endpoints of the request's pool that the dispatch gate keeps from new requests now
        (empty when the gate is off, or when it would leave the pool no endpoint: then a grant
        raced a change and placement chooses among all)."""
        if self.gate_s is None or not self.enabled:
            return frozenset()
        st = self._pool_stats(self.pool_of(p))
        return st.gated if len(st.gated) < st.usable else frozenset()

    def _prefilled(self, endpoint: str) -> None:
        """A first token arrived: that endpoint's prefill queue shrank, a waiter may go."""
        del endpoint
        if self.queue.waiting:
            self.queue.pump()

    def utilisation(self, pool: PoolKey) -> float:
        """Gateway in-flight ÷ capacity over the pool's usable endpoints (1.0 when it has none)."""
        st = self._pool_stats(pool)
        return st.inflight / st.capacity if st.capacity else 1.0

    def batch_spare(self, pool: PoolKey, launching: int, max_utilisation: float) -> bool:
        """Spare capacity for one more batch-lane request on ``pool``: no request of a band above
        ``batch`` waits in the queue, and the pool's utilisation with it (and the ``launching``
        ones not yet counted in flight) at most ``max_utilisation`` (or the pool idle, so that a
        small pool still makes progress). The batch worker and the simulator's batch lane ask."""
        q = self.queue
        if any(q.depth(band) for band in BANDS if band != "batch"):
            return False
        cap = self.capacity(pool)
        if cap <= 0:
            return True  # no usable endpoint: placement answers (and the line fails) at once
        busy = self.utilisation(pool) * cap + launching
        return (busy + 1) / cap <= max_utilisation or busy == 0

    def degraded(self, pool: PoolKey) -> str | None:
        st = self._pool_stats(pool)
        if not st.usable:
            return None
        err = st.lowest_error_rate
        if self.queue.slot_room(pool) <= 0:
            return "saturated"
        # every candidate failing: a retry cannot help
        if err >= self.spec.retry.degraded_error_rate:
            return f"every endpoint's error rate at least {err:.0%}"
        return None

    # -- the stage ------------------------------------------------------------------------
    async def admit(
        self,
        api: ApiKind,
        body: dict[str, Any],
        raw: bytes,
        headers: Mapping[str, str],
        tenant: TenantSpec,
        key_hash: str,
        profile: RequestProfile,
    ) -> Ticket:
        cls = self.classes[profile.workload_class]
        workflow = limits.workflow_header(headers)
        idem = limits.idempotency_header(headers)
        ticket = Ticket(tenant.name, key_hash, workflow, cls.name, profile)
        if not self.enabled:
            return ticket
        m = self.metrics
        try:
            await self._checks(api, body, raw, headers, tenant, key_hash, cls, idem, ticket)
        except BaseException as exc:
            if isinstance(exc, GatewayError):
                reason = exc.code or exc.error_type
                m.child(m.admission_rejected, m.tenant(tenant.name), reason).inc()
            # a shed retry keeps its mark's expiry: recognition ends `window_s` after the last
            # real failure, so a client honouring Retry-After is not locked out while degraded
            shed = isinstance(exc, GatewayError) and exc.code == "retry_shed"
            try:  # the hold is given back first: a store error in the mark cannot keep it
                if ticket.lease is not None:
                    await self.budgets.settle(ticket.lease, 0.0, 0)
            finally:
                if ticket.retry_key is not None and not shed:  # refused (or its client
                    await self._remember(ticket.retry_key, failed=True)  # left): a retry
            raise
        return ticket

    async def _checks(
        self,
        api: ApiKind,
        body: dict[str, Any],
        raw: bytes,
        headers: Mapping[str, str],
        tenant: TenantSpec,
        key_hash: str,
        cls: WorkloadClass,
        idem: str | None,
        t: Ticket,
    ) -> None:
        m = self.metrics
        now = self.clock()
        # 2. token ceiling
        ceiling = limits.apply_ceiling(api, body, t.profile.max_output_tokens, cls, tenant)
        if ceiling.rewrite:
            t.body = orjson.dumps(body)
            if ceiling.max_tokens != t.profile.max_output_tokens:
                t.profile = t.profile.with_(max_output_tokens=ceiling.max_tokens)
        if ceiling.clamped is not None:
            t.headers["x-inferplane-max-tokens-clamped"] = ceiling.clamped
            m.child(m.max_tokens_clamped, m.tenant(tenant.name), cls.name).inc()
        # 3. agent loop depth and fan-out
        step = limits.agent_step(headers)
        loop = tenant.loop
        if step is not None and loop.max_agent_step is not None and step > loop.max_agent_step:
            raise InvalidRequestError(
                f"agent loop too deep: x-inferplane-agent-step is {step}, tenant "
                f"{tenant.name!r} allows at most {loop.max_agent_step} steps",
                param="x-inferplane-agent-step",
                code="agent_loop_depth_exceeded",
            )
        if t.workflow is not None and loop.max_workflow_requests is not None:
            n = await self.store.incr(
                f"loop:{tenant.name}:{t.workflow}", loop.workflow_window_s, now
            )
            if n > loop.max_workflow_requests:
                raise InvalidRequestError(
                    f"agent loop too deep: workflow {t.workflow!r} made {n} requests within "
                    f"{loop.workflow_window_s:g} s, above the limit of "
                    f"{loop.max_workflow_requests}",
                    param="x-inferplane-workflow",
                    code="agent_loop_depth_exceeded",
                )
        offered, results = limits.tool_fanout(api, body)
        if offered or results or step is not None:
            m.child(m.tool_fanout, cls.name, "tools").observe(offered)
            m.child(m.tool_fanout, cls.name, "results").observe(results)
        # 4. client retries, shed first under degradation
        pool = self.pool_of(t.profile)
        m.child(m.admitted_requests, m.tenant(tenant.name), cls.name).inc()
        t.retry_key = retry_key(tenant.name, t.key_hash, idem, raw)
        if await self.store.marked(t.retry_key, now):  # its last try failed: a retry
            m.child(m.client_retries, m.tenant(tenant.name), cls.name).inc()
            why = self.degraded(pool)
            if why is not None:
                delay = self.spec.retry.shed_retry_after_s * (1.0 + self.rng.random())
                raise RateLimitError(
                    f"retry shed: the fleet serving {t.profile.model!r} is degraded ({why}); "
                    f"retries are shed first, retry after {delay:.1f} s",
                    code="retry_shed",
                    headers={
                        "Retry-After": str(math.ceil(delay)),
                        "retry-after-ms": str(int(delay * 1000)),
                    },
                )
        # 5. rate limits
        tokens = t.profile.prompt_tokens + t.profile.max_total_output_tokens
        buckets = limits.buckets(tenant, t.key_hash, tokens)
        if buckets:
            wait = await self.store.take(buckets, now)
            if wait > 0:
                raise RateLimitError(
                    f"rate limit: tenant {tenant.name!r} is over its requests or tokens per "
                    f"minute; retry after {wait:.2f} s",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
        # 6. budgets
        if tenant.budgets:
            usd = self.worst.usd(t.profile)
            t.lease = await self.budgets.reserve(
                tenant, t.key_hash, t.workflow, usd, tokens, t.settle_id, now
            )
        # 7. priority and fairness
        if self.spec.queue.enabled:
            deadline_ms = cls.queue_deadline_ms or self.spec.queue.default_deadline_ms
            t.grant = await self.queue.acquire(
                tenant.name, cls.priority, pool, tokens, deadline_ms / 1000.0
            )
            if t.grant.waited_s > 0:
                m.child(m.queue_wait, cls.priority).observe(t.grant.waited_s)

    def placed(self, t: Ticket) -> None:
        """The request is about to reserve endpoint capacity: its queue slot is used."""
        if t.grant is not None:
            t.grant.started()

    async def finish(self, t: Ticket) -> None:
        """Settle, give back, attribute. Idempotent; safe on every path (error, cancel).

        On `MemoryStore` `finish_soon` runs all of this eagerly in the caller's turn (see
        there): nothing on that path may wait or enter an ``asyncio.timeout``."""
        if t.done:
            return
        t.done = True
        if t.grant is not None:
            t.grant.release()
        observed = t.usd is not None
        usd = t.usd or 0.0
        tokens = t.prompt_tokens + t.completion_tokens
        if t.grant is not None and observed:
            self.queue.charge(t.tenant, tokens - t.grant.tokens)
        self.queue.pump()
        if not self.enabled:
            return
        if t.lease is not None:  # first: no mark (a store call) delays or skips the settle
            await self.budgets.settle(t.lease, usd, tokens if observed else 0)
        if observed:
            m = self.metrics
            who = m.tenant(t.tenant)
            m.child(m.tenant_cost, who, t.workload_class).inc(usd)
            m.child(m.tenant_tokens, who, t.workload_class, "prompt").inc(t.prompt_tokens)
            m.child(m.tenant_tokens, who, t.workload_class, "completion").inc(
                t.completion_tokens
            )
            day = self._utc_day(self.clock())
            group = (day, t.workflow or "", t.profile.model, t.workload_class, t.key_hash[7:23])
            await self.store.add_usage(
                t.tenant, group, usd, t.prompt_tokens, t.completion_tokens, t.settle_id
            )
        if t.retry_key is not None:
            # a re-send after a failure is a retry; after a success (Regenerate) it is not
            await self._remember(t.retry_key, failed=not t.succeeded)

    async def _remember(self, key: str, *, failed: bool) -> None:
        """Mark (failed) or clear a retry key. A store error here is logged, not raised: the
        outcome it would replace (a refusal, a settled answer) matters more than one missed
        retry recognition."""
        try:
            if failed:
                await self.store.mark(key, self.spec.retry.window_s, self.clock())
            else:
                await self.store.unmark(key)
        except Exception as exc:  # any store's failure: see above
            log.warning("admission: retry mark not written: %s", exc)

    def _utc_day(self, now: float) -> str:
        """``YYYY-MM-DD`` of a Unix time in UTC (formatted once per day, not per request)."""
        if not self._day[0] <= now < self._day[1]:
            d = datetime.fromtimestamp(now, UTC)
            start = datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()
            self._day = (start, start + 86400.0, d.strftime("%Y-%m-%d"))
        return self._day[2]

    def finish_soon(self, t: Ticket) -> asyncio.Future[None]:
        """`finish`, started once per ticket (later calls return the same future). Front ends
        start it before the answer's last bytes and wait for it (`settled`), so a killed
        gateway has not lost the spend of an answered request.

        On the in-memory store, whose calls never wait, it runs at once (`inferplane.eagerly`):
        the settle is done when this returns, with no task and no turn of the event loop for
        `settled` to wait. Any other store's settle runs in a task of its own: its calls wait,
        and their timeouts (``asyncio.timeout``) bind to the task they start in, which in an
        eager first step would be the caller's."""
        if t.settling is None:
            coro = self.finish(t)
            t.settling = (eagerly.start(coro) if type(self.store) is MemoryStore
                          else asyncio.create_task(coro))
            if t.settling.done():
                self._finished(t.settling)  # now: no callback for the loop to run
            else:
                self._tasks.add(t.settling)
                t.settling.add_done_callback(self._finished)
        return t.settling

    async def settled(self, t: Ticket, timeout_s: float) -> bool:
        """Start the ticket's settle and wait until it is written to the admission store, at
        most ``timeout_s``; False (and counted in inferplane_admission_settle_timeouts_total)
        when the wait ran out or the settle failed (the settle itself goes on)."""
        task = self.finish_soon(t)
        if not task.done():
            await asyncio.wait((task,), timeout=timeout_s)  # neither raises nor cancels it
        if task.done() and not task.cancelled() and task.exception() is None:
            return True
        self.metrics.admission_settle_timeouts.inc()
        return False

    def _finished(self, task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("admission settle failed: %s", task.exception())

    async def usage(self, tenant: str, group_by: list[str]) -> list[dict[str, Any]]:
        """The tenant's usage summed over ``group_by`` (day, workflow, model, class, key)."""
        index = {"day": 0, "workflow": 1, "model": 2, "class": 3, "key": 4}
        sums: dict[tuple[str, ...], list[float]] = {}
        for row in await self.store.usage(tenant):
            g = tuple(row.group[index[k]] for k in group_by)
            s = sums.setdefault(g, [0.0, 0, 0, 0])
            s[0] += row.usd
            s[1] += row.prompt_tokens
            s[2] += row.completion_tokens
            s[3] += row.requests
        return [
            {
                **dict(zip(group_by, g, strict=True)),
                "requests": int(s[3]),
                "prompt_tokens": int(s[1]),
                "completion_tokens": int(s[2]),
                "cost_usd": round(s[0], 9),
            }
            for g, s in sorted(sums.items())
        ]

    async def start(self) -> None:
        ping = getattr(self.store, "ping", None)
        if ping is not None:
            await ping()
        if self.enabled and self.spec.queue.enabled and self._ticker is None:
            self._ticker = asyncio.create_task(self._tick(self.spec.queue.tick_s))

    async def _tick(self, period_s: float) -> None:
        """Re-check the queue every ``queue.tick_s`` while anything waits: capacity also frees
        without a request of this gateway finishing (an endpoint back in service, a fresher
        scrape, another process's requests ending). While nothing waits it sleeps until a
        request is queued (no wake-ups of an idle gateway).

        The ticks stay on the grid of the ticker's start (each tick_s after the last, as
        back-to-back ``asyncio.sleep(tick_s)`` calls were; across an idle spell the grid is
        accumulated ``+= tick_s``): a request queued after an idle spell is re-checked at the
        next grid instant, not tick_s after it arrived, so a tick is where the always-ticking
        loop put it. With ``tick_while_idle`` (the simulator) it also ticks while nothing waits:
        the virtual loop runs the timers due within 1 ns of the earliest at that one's clock
        reading, so an idle tick can round an event beside it by an ulp (bench/fairness_sim.py
        --duration 4 without it: the victim-alone P99s differ in the 14th digit); with it every
        result is the always-ticking loop's, bit for bit.
        """
        loop = asyncio.get_running_loop()
        nonempty = self.queue.nonempty
        while True:
            at = loop.time() + period_s  # as asyncio.sleep(period_s) schedules it
            if not self.queue.waiting and not self.tick_while_idle:
                await nonempty.wait()
                at = _next_grid(at, period_s, loop.time())
            await _sleep_until(loop, at)
            if self.queue.waiting:
                try:
                    self.queue.pump()
                except Exception:  # a bug here must not stop later grants
                    log.exception("admission queue tick failed")

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()


_GRID_STEPS = 1 << 16
"""Grid steps `_next_grid` accumulates one by one (~55 min of 20 Hz ticks, a few ms of CPU);
a longer idle spell jumps by multiplication (the grid then drifts by rounding, harmlessly)."""


def _next_grid(at: float, period_s: float, now: float) -> float:
    """The first instant of the grid ``at + k * period_s`` (k >= 0) that is not before ``now``;
    ``at`` is a grid instant. Accumulated ``at += period_s`` as consecutive sleeps were."""
    if now - at > _GRID_STEPS * period_s:
        at += (int((now - at) / period_s) - 1) * period_s
    while at < now:
        at += period_s
    return at


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _sleep_until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    """``asyncio.sleep`` to an absolute loop time (``loop.call_at``: no drift from re-adding a
    period to the wake-up time)."""
    fut = loop.create_future()
    handle = loop.call_at(when, _wake, fut)
    try:
        await fut
    finally:
        handle.cancel()
