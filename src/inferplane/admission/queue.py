"""Priority and fairness while the fleet is saturated.

A request goes straight through while its **pool** (the usable endpoints that serve its model in
its allowed jurisdictions and kinds) has a free slot: ``Σ max(0, max_concurrency − in_flight)``
minus the requests already granted but not yet placed. Otherwise it waits:

- **strict priority** across bands: critical, then standard, then sheddable, then batch;
- **fair share** inside a band: the tenant with the smallest *virtual token counter* goes first
  (VTC, Sheng et al. 2024): each grant adds the request's tokens (prompt + max_tokens, corrected
  to the actual tokens at completion) to its tenant's counter; a tenant that starts waiting is
  lifted to the smallest counter among the band's waiting tenants, so idle time banks no credit;
- FIFO inside a tenant (ties between tenants go to the older head);
- **fair share of the pool's slots** (work-conserving, with a small reserve): a tenant's *fair
  share* is ``capacity ÷ active tenants`` (active: holding a slot, waiting, or seen within
  ``active_window_s``). Inside a band, tenants below their share go before tenants at or above it
  (then VTC). While more than one tenant is active, the last ``reserve`` free slots
  (``ceil(reserve_fraction × capacity)``) go only to tenants below their share, so a light
  tenant finds a slot at once instead of waiting for one of a flooding tenant's in-flight
  requests to end. A lone tenant may use every slot; a reserved slot that nobody below their
  share wants stays idle at most until the other tenants have been quiet for
  ``active_window_s``. A band whose waiter is held back by the reserve also holds back the lower
  bands on that pool (strict priority is never traded for fairness);
- a per-class **deadline**: past it the request gets 503 ``queue_timeout``;
- **headroom for the bands above** (``shed_above``, off by default): while the pool's in-flight
  plus pending grants ÷ its slots would pass ``shed_above``, a sheddable request is refused at
  once with 429 ``load_shed`` (waiting ones too), and a batch request waits — so past the knee
  the last slots go to critical and standard traffic; under a dispatch gate the last
  ``ceil((1 - shed_above) × room_capacity)`` prefill starts are kept for them too (sheddable and
  batch requests wait for a start beyond those: `starts_kept`);
- **strict shares** (``keep_unused_shares``, off by default): the reserve is at least the slots
  the other active tenants hold below their fair share, so while they are active a tenant above
  its share never takes the slots they are entitled to (less work-conserving: those slots may
  stay idle for up to ``active_window_s``);
- when ``max_waiting`` requests wait, the newest request of the most sheddable band below the
  newcomer's (sheddable, then batch, then standard) is shed with 429 ``load_shed``; if there is
  none, the newest waiter of the newcomer's band from the tenant with the most waiters there
  (when that is another tenant, with at least two more waiters than the newcomer's), so that a
  tenant flooding the queue cannot crowd out another tenant's requests; else the newcomer is.

- a **dispatch gate** (``max_prefill_queue_s``, off by default; `Admission` computes it): an
  endpoint counts as free only while the prefill the gateway sent it and has not seen a first
  token for is under the gate, and then for one request at a time; the excess waits here, in fair
  order, instead of in the engine's FIFO behind a flooding tenant's prompts. The reserve is then a
  fraction of the most requests the pool can take at once (``room_capacity``), and the headroom
  test still counts slots (``slot_room``). A granted request may still go to a gated endpoint
  whose cached prefix saves it more than the prefill queued there costs (placement decides:
  `inferplane.placement.framework`, ``_gate_holders``, ``_gate_keep``).

Grants happen in `pump`, called when capacity frees (a request finishes, a first token arrives
under the gate) and every ``tick_s``.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import NamedTuple

from inferplane.errors import GatewayError, RateLimitError

BANDS = ("critical", "standard", "sheddable", "batch")
_LOW_BANDS = frozenset({"sheddable", "batch"})
SHED_ORDER = ("sheddable", "batch", "standard", "critical")

PoolKey = Hashable


class Share(NamedTuple):
    """A pool's fair shares per active tenant and the reserves kept for tenants below them.

    ``slots``: Σ max_concurrency ÷ active tenants; ``reserve``: the free slots a tenant at or
    above it may not take. Under a dispatch gate also ``starts``: the requests the pool can
    start at once (`FairQueue.room_capacity`) ÷ active tenants, compared with the tenant's
    requests still prefilling, and ``starts_reserve``, the free starts a tenant at or above it
    may not take (without a gate: infinite and 0, never binding)."""

    slots: float
    reserve: int
    starts: float = math.inf
    starts_reserve: int = 0


class QueueTimeoutError(GatewayError):
    """Waited past the class's queue deadline for a free slot."""

    status = 503
    error_type = "queue_timeout"
    code = "queue_timeout"


@dataclass(eq=False, slots=True)
class Grant:
    """A slot granted to one request: `started` once it is placed (or given up)."""

    queue: FairQueue | None
    pool: PoolKey
    tenant: str
    tokens: int
    waited_s: float = 0.0
    pending: bool = True
    held: bool = True
    prefilling: bool = False  # counted in the queue's prefills (under a dispatch gate)

    def started(self) -> None:
        if self.pending:
            self.pending = False
            if self.queue is not None:
                self.queue._pending[self.pool] -= 1

    def prefilled(self) -> None:
        """The request's first token arrived (or it ended): its prefill is over (idempotent)."""
        if self.prefilling:
            self.prefilling = False
            if self.queue is not None:
                self.queue._count_prefill(self.pool, self.tenant, -1)

    def release(self) -> None:
        """The request is over: its tenant no longer holds the slot (idempotent)."""
        self.started()
        self.prefilled()
        if self.held:
            self.held = False
            if self.queue is not None:
                self.queue._release(self.pool, self.tenant)


@dataclass(eq=False, slots=True)
class _Waiter:
    tenant: str
    band: str
    pool: PoolKey
    tokens: int
    seq: int
    enq_at: float
    future: asyncio.Future[Grant] = field(repr=False)


class FairQueue:
    """Per-band queues with strict priority across bands and VTC fair share inside a band."""

    def __init__(
        self,
        free_slots: Callable[[PoolKey], int],
        *,
        capacity: Callable[[PoolKey], int] | None = None,
        room_capacity: Callable[[PoolKey], int] | None = None,
        slot_room: Callable[[PoolKey], int] | None = None,
        reserve_fraction: float = 0.0,
        active_window_s: float = 5.0,
        max_waiting: int = 1024,
        clock: Callable[[], float] = time.monotonic,
        on_shed: Callable[[str, str], None] | None = None,
        envelope: Callable[[PoolKey], int] | None = None,
        shed_above: float | None = None,
        keep_unused_shares: bool = False,
    ) -> None:
        self.free_slots = free_slots
        self.capacity = capacity  # None: no fair-share caps (VTC order only)
        # the most ``free_slots`` can be (the reserve is a fraction of it); default: capacity
        self.room_capacity = room_capacity
        # free slots whatever a dispatch gate says (the headroom test); default: free_slots
        self._slot_free = slot_room
        self.envelope = envelope  # the pool's slots (Σ max_concurrency), for ``shed_above``
        self.shed_above = shed_above
        self.keep_unused_shares = keep_unused_shares
        self.reserve_fraction = reserve_fraction
        self.active_window_s = active_window_s
        self.max_waiting = max_waiting
        self.clock = clock
        self.on_shed = on_shed
        self.vtc: dict[str, float] = {}
        self._bands: dict[str, dict[str, deque[_Waiter]]] = {b: {} for b in BANDS}
        self._pending: dict[PoolKey, int] = {}
        self._waiting_pool: dict[PoolKey, int] = {}
        self._held: dict[PoolKey, dict[str, int]] = {}  # granted and not yet released
        # granted and no first token yet, per tenant (kept only under a dispatch gate)
        self._prefills: dict[PoolKey, dict[str, int]] = {}
        self._waiting_tenant: dict[PoolKey, dict[str, int]] = {}
        self._seen: dict[PoolKey, dict[str, float]] = {}  # last arrival per tenant
        self._seq = itertools.count()
        self.waiting = 0
        self.nonempty = asyncio.Event()  # set while any request waits (the ticker's wake-up)

    # -- capacity -------------------------------------------------------------------------
    def room(self, pool: PoolKey) -> int:
        return self.free_slots(pool) - self._pending.get(pool, 0)

    def slot_room(self, pool: PoolKey) -> int:
        """Free slots less pending grants, whatever a dispatch gate says."""
        if self._slot_free is None:
            return self.room(pool)
        return self._slot_free(pool) - self._pending.get(pool, 0)

    def depth(self, band: str) -> int:
        return sum(len(q) for q in self._bands[band].values())

    def over_headroom(self, band: str, pool: PoolKey, room: int) -> bool:
        """A request of a low band (sheddable, batch) may not take a slot of ``pool`` now: the
        pool's utilisation with it would pass ``shed_above`` (the rest is kept for the bands
        above)."""
        if self.shed_above is None or self.envelope is None or band not in _LOW_BANDS:
            return False
        cap = self.envelope(pool)
        if self._slot_free is not None:
            room = self.slot_room(pool)
        return cap > 0 and cap - room + 1 > self.shed_above * cap

    def starts_kept(self, band: str, pool: PoolKey, room: int) -> bool:
        """Under a dispatch gate with ``shed_above``, the headroom for the bands above counts
        prefill starts too: a low-band request (sheddable, batch) may not take one of the pool's
        last ``ceil((1 - shed_above) × room_capacity)`` starts (at most all but one), and waits
        for a start beyond them. So a standard request rarely finds every engine prefilling
        lower-priority prompts. ``room``: the pool's free starts now."""
        if self.shed_above is None or self.room_capacity is None or band not in _LOW_BANDS:
            return False
        most = self.room_capacity(pool)
        keep = min(math.ceil(round((1.0 - self.shed_above) * most, 9)), most - 1)
        return room <= keep

    def _shed_low(self, band: str, pool: PoolKey) -> RateLimitError:
        if self.on_shed is not None:
            self.on_shed(band, "headroom")
        return RateLimitError(
            f"load shed: the fleet serving this request is over "
            f"{self.shed_above:.0%} of its concurrency; {band} traffic is refused first so that "
            "interactive traffic keeps its latency (admission.queue.shed_above_utilisation)",
            code="load_shed",
            headers={"Retry-After": "1"},
        )

    def held(self, pool: PoolKey, tenant: str) -> int:
        """Slots of the pool the tenant holds (granted, not yet released)."""
        return self._held.get(pool, {}).get(tenant, 0)

    def _grant(self, tenant: str, pool: PoolKey, tokens: int, waited: float) -> Grant:
        self._pending[pool] = self._pending.get(pool, 0) + 1
        held = self._held.setdefault(pool, {})
        held[tenant] = held.get(tenant, 0) + 1
        self.vtc[tenant] = self.vtc.get(tenant, 0.0) + tokens
        gated = self.room_capacity is not None
        if gated:
            self._count_prefill(pool, tenant, +1)
        return Grant(self, pool, tenant, tokens, waited, prefilling=gated)

    def _count_prefill(self, pool: PoolKey, tenant: str, d: int) -> None:
        per = self._prefills.setdefault(pool, {})
        n = per.get(tenant, 0) + d
        if n > 0:
            per[tenant] = n
        else:
            per.pop(tenant, None)

    def _release(self, pool: PoolKey, tenant: str) -> None:
        held = self._held.get(pool)
        if held is not None and tenant in held:
            held[tenant] -= 1
            if held[tenant] <= 0:
                del held[tenant]

    # -- fair share -----------------------------------------------------------------------
    def _active(self, pool: PoolKey, now: float) -> set[str]:
        """Tenants holding a slot of the pool, waiting for one, or seen lately."""
        seen = self._seen.get(pool, {})
        for t in [t for t, at in seen.items() if now - at > self.active_window_s]:
            del seen[t]
        return set(seen) | set(self._held.get(pool, {})) | set(self._waiting_tenant.get(pool, {}))

    def share(self, pool: PoolKey) -> Share | None:
        """The pool's fair shares per tenant and reserves (`Share`), or None when no caps apply
        (one active tenant, or no capacity known)."""
        if self.capacity is None:
            return None
        n = len(self._active(pool, self.clock()))
        cap = self.capacity(pool)
        if n <= 1 or cap <= 0:
            return None
        slots = Share(cap / n, math.ceil(self.reserve_fraction * cap))
        if self.room_capacity is None:
            return slots
        most = self.room_capacity(pool)
        starts_reserve = math.ceil(self.reserve_fraction * most)
        return slots._replace(starts=most / n, starts_reserve=starts_reserve)

    def _eligible(self, tenant: str, pool: PoolKey, room: int, share: Share | None) -> bool:
        if room <= 0:
            return False
        if share is None:
            return True
        if self.held(pool, tenant) >= share.slots:
            reserve = share.reserve
            if self.keep_unused_shares:
                reserve = max(reserve, self._unused_shares(pool, tenant, share.slots))
            if (room if self._slot_free is None else self.slot_room(pool)) <= reserve:
                return False
        return self._prefilling(pool, tenant) < share.starts or room > share.starts_reserve

    def _unused_shares(self, pool: PoolKey, tenant: str, fair: float) -> int:
        """Slots the other active tenants hold below their fair share: kept free for them."""
        held = self._held.get(pool, {})
        return sum(
            max(0, math.ceil(fair) - held.get(t, 0))
            for t in self._active(pool, self.clock())
            if t != tenant
        )

    def _prefilling(self, pool: PoolKey, tenant: str) -> int:
        return self._prefills.get(pool, {}).get(tenant, 0)

    def _below_share(self, tenant: str, pool: PoolKey, share: Share | None) -> bool:
        """Below its fair share of slots and (under a dispatch gate) of the prefills in flight:
        a tenant whose requests fill every endpoint's prefill queue is not below its share, even
        while it holds fewer slots than its share."""
        if share is None:
            return True
        held, prefilling = self.held(pool, tenant), self._prefilling(pool, tenant)
        return held < share.slots and prefilling < share.starts

    def charge(self, tenant: str, delta_tokens: float) -> None:
        """Correct a tenant's counter once the actual tokens are known."""
        self.vtc[tenant] = max(0.0, self.vtc.get(tenant, 0.0) + delta_tokens)

    # -- waiting --------------------------------------------------------------------------
    async def acquire(
        self, tenant: str, band: str, pool: PoolKey, tokens: int, deadline_s: float
    ) -> Grant:
        """A slot now, or after waiting; raises 503 past the deadline, 429 when shed."""
        self._seen.setdefault(pool, {})[tenant] = self.clock()
        if band == "sheddable" and self.over_headroom(band, pool, self.room(pool)):
            raise self._shed_low(band, pool)
        if self._waiting_pool.get(pool, 0) == 0:
            room = self.room(pool)
            if (room > 0 and self._eligible(tenant, pool, room, self.share(pool))
                    and not self.over_headroom(band, pool, room)
                    and not self.starts_kept(band, pool, room)):
                return self._grant(tenant, pool, tokens, 0.0)
        if self.waiting >= self.max_waiting:
            self._shed_for(band, tenant)
        loop = asyncio.get_running_loop()
        tenants = self._bands[band]
        if tenant not in tenants or not tenants[tenant]:
            active = [self.vtc.get(t, 0.0) for t, q in tenants.items() if q]
            if active:
                self.vtc[tenant] = max(self.vtc.get(tenant, 0.0), min(active))
        w = _Waiter(tenant, band, pool, tokens, next(self._seq), self.clock(), loop.create_future())
        tenants.setdefault(tenant, deque()).append(w)
        self._count_waiting(w, +1)
        self.pump()
        try:
            async with asyncio.timeout(deadline_s):  # not wait_for: see inferplane.waits
                return await asyncio.shield(w.future)
        except TimeoutError:
            if w.future.done() and not w.future.cancelled() and w.future.exception() is None:
                return w.future.result()
            self._remove(w)
            raise QueueTimeoutError(
                f"no capacity for model pool within the {band} queue deadline of "
                f"{deadline_s * 1000:.0f} ms (fleet saturated)",
                headers={"Retry-After": str(max(1, math.ceil(deadline_s)))},
            ) from None
        except asyncio.CancelledError:
            if w.future.done() and not w.future.cancelled() and w.future.exception() is None:
                g = w.future.result()
                g.release()
                self.charge(tenant, -g.tokens)
            else:
                self._remove(w)
            raise

    def _count_waiting(self, w: _Waiter, d: int) -> None:
        self.waiting += d
        if self.waiting > 0:
            self.nonempty.set()
        else:
            self.nonempty.clear()
        self._waiting_pool[w.pool] = self._waiting_pool.get(w.pool, 0) + d
        per = self._waiting_tenant.setdefault(w.pool, {})
        per[w.tenant] = per.get(w.tenant, 0) + d
        if per[w.tenant] <= 0:
            del per[w.tenant]

    def _remove(self, w: _Waiter) -> None:
        q = self._bands[w.band].get(w.tenant)
        if q is not None and w in q:
            q.remove(w)
            self._count_waiting(w, -1)
        if not w.future.done():
            w.future.cancel()

    def _shed_for(self, band: str, tenant: str) -> None:
        for victim_band in SHED_ORDER:
            if victim_band == band:
                break
            newest: _Waiter | None = None
            for q in self._bands[victim_band].values():
                if q and (newest is None or q[-1].seq > newest.seq):
                    newest = q[-1]
            if newest is not None:
                self._remove_shed(newest)
                return
        # Same band: a tenant flooding the queue loses its newest waiter before another tenant's
        # newcomer is refused (the newcomer's tenant must wait on fewer requests than it).
        mine = len(self._bands[band].get(tenant, ()))
        heaviest = max(
            ((len(q), t) for t, q in self._bands[band].items() if q and t != tenant), default=None
        )
        if heaviest is not None and heaviest[0] > mine + 1:
            self._remove_shed(
                self._bands[band][heaviest[1]][-1],
                f"load shed: the queue is full and tenant {heaviest[1]!r} has the most waiting "
                f"requests in the {band!r} band",
            )
            return
        if self.on_shed is not None:
            self.on_shed(band, "queue_full")
        raise RateLimitError(
            f"load shed: {self.waiting} requests already wait for capacity and none ranks below "
            f"the {band!r} band",
            code="load_shed",
            headers={"Retry-After": "1"},
        )

    def _remove_shed(self, w: _Waiter, message: str | None = None) -> None:
        q = self._bands[w.band][w.tenant]
        q.remove(w)
        self._count_waiting(w, -1)
        if self.on_shed is not None:
            self.on_shed(w.band, "queue_full")
        w.future.set_exception(
            RateLimitError(
                message or f"load shed: the {w.band!r} band was shed to admit higher-priority work",
                code="load_shed",
                headers={"Retry-After": "1"},
            )
        )

    def pump(self) -> int:
        """Grant every waiter that has room, best first; the number granted."""
        granted = 0
        if self.shed_above is not None and self.depth("sheddable"):
            for sq in list(self._bands["sheddable"].values()):
                for sw in list(sq):
                    if self.over_headroom("sheddable", sw.pool, self.room(sw.pool)):
                        sq.remove(sw)
                        self._count_waiting(sw, -1)
                        if not sw.future.done():
                            sw.future.set_exception(self._shed_low("sheddable", sw.pool))
        while self.waiting:
            w = self._best()
            if w is None:
                break
            q = self._bands[w.band][w.tenant]
            q.remove(w)
            self._count_waiting(w, -1)
            g = self._grant(w.tenant, w.pool, w.tokens, self.clock() - w.enq_at)
            if not w.future.done():
                w.future.set_result(g)
                granted += 1
            else:  # cancelled meanwhile: give the slot back
                g.release()
                self.charge(w.tenant, -w.tokens)
        return granted

    def _best(self) -> _Waiter | None:
        """The next waiter to grant: the first band with an eligible waiter; inside it, tenants
        below their fair share first, then by virtual tokens, then the older head."""
        pools: dict[PoolKey, tuple[int, Share | None]] = {}
        held_back: set[PoolKey] = set()  # a higher band waits on it: lower bands may not jump

        def pool_state(pool: PoolKey) -> tuple[int, Share | None]:
            st = pools.get(pool)
            if st is None:
                room = self.room(pool)
                st = pools[pool] = (room, self.share(pool) if room > 0 else None)
            return st

        for band in BANDS:
            tenants = self._bands[band]
            busy = [t for t, q in tenants.items() if q]
            if not busy:
                continue

            def rank(t: str, tenants: dict[str, deque[_Waiter]] = tenants
                     ) -> tuple[bool, float, int]:
                head = tenants[t][0]
                _, share = pool_state(head.pool)
                below = self._below_share(t, head.pool, share)
                return (not below, self.vtc.get(t, 0.0), head.seq)

            waited_on: set[PoolKey] = set()
            for t in sorted(busy, key=rank):
                for w in tenants[t]:
                    waited_on.add(w.pool)
                    if w.pool in held_back:
                        continue
                    room, share = pool_state(w.pool)
                    if self._eligible(t, w.pool, room, share) and not self.over_headroom(
                        w.band, w.pool, room
                    ) and not self.starts_kept(w.band, w.pool, room):
                        return w
            held_back |= waited_on
        return None
