"""Fair shares of a pool's slots (`FairQueue` with capacity): the reserve for tenants below their
share, work conservation for a lone tenant, and strict priority across bands kept."""

from __future__ import annotations

import asyncio

from inferplane.admission.queue import FairQueue, Grant


class Pool:
    """A fake fleet pool: ``cap`` slots, a slot taken when a grant is placed, freed on release."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.placed = 0

    def free(self, pool: object) -> int:
        return self.cap - self.placed

    def capacity(self, pool: object) -> int:
        return self.cap

    def start(self, g: Grant) -> Grant:
        g.started()
        self.placed += 1
        return g

    def end(self, q: FairQueue, g: Grant) -> None:
        self.placed -= 1
        g.release()
        q.pump()


def make(cap: int, reserve: float = 0.125, now: list[float] | None = None
         ) -> tuple[FairQueue, Pool]:
    clock = now if now is not None else [0.0]
    pool = Pool(cap)
    q = FairQueue(pool.free, capacity=pool.capacity, reserve_fraction=reserve,
                  active_window_s=2.0, clock=lambda: clock[0])
    return q, pool


async def test_light_tenant_takes_the_reserved_slot_while_the_flood_waits() -> None:
    now = [0.0]
    q, pool = make(8, now=now)
    flood = [pool.start(await q.acquire("a", "standard", "p", 10, 5.0)) for _ in range(7)]
    light = pool.start(await q.acquire("b", "standard", "p", 10, 5.0))  # 8th slot, no wait
    assert light.waited_s == 0.0 and q.held("p", "b") == 1
    pool.end(q, light)
    # b is still active (seen 0 s ago): a, holding 7 ≥ its share 4, may not take the last slot
    waiting = asyncio.create_task(q.acquire("a", "standard", "p", 10, 5.0))
    await asyncio.sleep(0)
    assert not waiting.done() and q.waiting == 1
    light = pool.start(await q.acquire("b", "standard", "p", 10, 5.0))  # jumps ahead of a
    pool.end(q, light)
    pool.end(q, flood.pop())  # a slot above the reserve frees: a's waiter goes
    g = pool.start(await asyncio.wait_for(waiting, 1.0))
    assert q.held("p", "a") == 7 and g.tenant == "a"


async def test_a_lone_tenant_uses_every_slot_once_others_are_quiet() -> None:
    now = [0.0]
    q, pool = make(4, now=now)  # reserve: ceil(0.125 × 4) = 1 slot
    b = pool.start(await q.acquire("b", "standard", "p", 1, 5.0))
    grants = [pool.start(await q.acquire("a", "standard", "p", 1, 5.0)) for _ in range(2)]
    pool.end(q, b)
    # a holds 2 = its share (4 slots ÷ 2 active): it may take a free slot above the reserve …
    grants.append(pool.start(await q.acquire("a", "standard", "p", 1, 0.5)))
    # … but not the reserved last one while b counts as active
    waiting = asyncio.create_task(q.acquire("a", "standard", "p", 1, 5.0))
    await asyncio.sleep(0)
    assert not waiting.done() and q.room("p") == 1
    now[0] = 3.0  # b has been quiet past the active window: a is alone, nothing reserved
    q.pump()
    grants.append(pool.start(await asyncio.wait_for(waiting, 1.0)))
    assert q.held("p", "a") == 4 and q.room("p") == 0


async def test_below_share_tenants_go_first_inside_a_band() -> None:
    q, pool = make(4, reserve=0.0)
    a = [pool.start(await q.acquire("a", "standard", "p", 1, 5.0)) for _ in range(4)]
    order: list[str] = []

    async def req(t: str) -> None:
        order.append((await q.acquire(t, "standard", "p", 1, 5.0)).tenant)

    tasks = [asyncio.create_task(req(t)) for t in ("a", "a", "b")]
    await asyncio.sleep(0)
    q.vtc["b"] = 1e9  # even with a larger counter, b (0 held < share 2) goes before a (4 held)
    pool.end(q, a.pop())
    for _ in range(20):
        await asyncio.sleep(0)
    assert order == ["b"]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_reserve_never_lets_a_lower_band_jump_a_higher_one() -> None:
    q, pool = make(4, reserve=0.25)
    a = [pool.start(await q.acquire("a", "critical", "p", 1, 5.0)) for _ in range(3)]
    b = pool.start(await q.acquire("b", "batch", "p", 1, 5.0))
    pool.end(q, b)  # one free slot, the reserved one
    crit = asyncio.create_task(q.acquire("a", "critical", "p", 1, 5.0))
    await asyncio.sleep(0)
    low = asyncio.create_task(q.acquire("b", "batch", "p", 1, 5.0))
    await asyncio.sleep(0)
    assert not crit.done() and not low.done()  # a over share; b's batch may not jump a's band
    pool.end(q, a.pop())
    assert (await asyncio.wait_for(crit, 1.0)).tenant == "a"
    low.cancel()
    await asyncio.gather(low, return_exceptions=True)
    assert q.waiting == 0


async def test_release_is_idempotent_and_cancelled_grants_give_back() -> None:
    q, _ = make(2)
    g = await q.acquire("a", "standard", "p", 1, 5.0)
    g.release()
    g.release()
    assert q.held("p", "a") == 0 and q.room("p") == 2


async def test_a_full_queue_sheds_the_flooding_tenants_newest_waiter_not_a_newcomer() -> None:
    from inferplane.errors import RateLimitError

    pool = Pool(2)
    q = FairQueue(pool.free, capacity=pool.capacity, reserve_fraction=0.0, active_window_s=2.0,
                  max_waiting=4, clock=lambda: 0.0)
    held = [pool.start(await q.acquire("a", "standard", "p", 10, 5.0)) for _ in range(2)]
    flood = [asyncio.create_task(q.acquire("a", "standard", "p", 10, 5.0)) for _ in range(4)]
    await asyncio.sleep(0)
    assert q.waiting == 4
    light = asyncio.create_task(q.acquire("b", "standard", "p", 10, 5.0))
    await asyncio.sleep(0)
    assert not light.done() and q.waiting == 4  # b waits; a's newest waiter was shed
    await asyncio.wait([flood[-1]], timeout=1.0)
    exc = flood[-1].exception()
    assert isinstance(exc, RateLimitError) and "most waiting requests" in exc.message
    assert not any(f.done() for f in flood[:-1])
    pool.end(q, held.pop())
    g = pool.start(await asyncio.wait_for(light, 1.0))  # b (below its share) goes first
    assert g.tenant == "b"
    # a newcomer of the flooding tenant itself is refused when the queue is full
    extra = asyncio.create_task(q.acquire("a", "standard", "p", 10, 5.0))
    await asyncio.sleep(0)
    with_new = asyncio.create_task(q.acquire("a", "standard", "p", 10, 5.0))
    await asyncio.wait([with_new], timeout=1.0)
    assert isinstance(with_new.exception(), RateLimitError)
    for t in [*flood[:-1], extra]:
        t.cancel()
    await asyncio.gather(*flood[:-1], extra, return_exceptions=True)


async def test_headroom_sheds_sheddable_and_holds_batch_while_standard_still_goes() -> None:
    from inferplane.errors import RateLimitError

    pool = Pool(10)
    q = FairQueue(pool.free, capacity=None, envelope=pool.capacity, shed_above=0.8,
                  clock=lambda: 0.0)
    held = [pool.start(await q.acquire("a", "standard", "p", 10, 5.0)) for _ in range(7)]
    low = pool.start(await q.acquire("a", "sheddable", "p", 10, 5.0))  # 8/10: still allowed
    try:
        await q.acquire("a", "sheddable", "p", 10, 5.0)  # 9/10 would pass 0.8
        raise AssertionError("not shed")
    except RateLimitError as exc:
        assert exc.code == "load_shed" and exc.headers["Retry-After"] == "1"
    batch = asyncio.create_task(q.acquire("a", "batch", "p", 10, 5.0))
    await asyncio.sleep(0)
    assert not batch.done()  # batch waits instead
    top = [pool.start(await q.acquire("a", "standard", "p", 10, 5.0)) for _ in range(2)]
    assert pool.placed == 10  # the headroom went to the standard band
    for g in top:
        pool.end(q, g)
    assert not batch.done()
    pool.end(q, low)  # 7 in flight: the batch request fits under 0.8 again
    g = pool.start(await asyncio.wait_for(batch, 1.0))
    assert g.tenant == "a" and pool.placed == 8
    for h in [*held, g]:
        pool.end(q, h)


class GatedPool:
    """A fake pool under a dispatch gate: ``n`` endpoints of ``slots`` slots each, one prompt
    prefilling at a time per endpoint (`Admission` computes the same from the fleet)."""

    def __init__(self, n: int, slots: int) -> None:
        self.n, self.slots = n, slots
        self.busy = 0  # endpoints with a prompt prefilling
        self.placed = 0

    def free(self, pool: object) -> int:  # one start per endpoint not prefilling
        return min(self.n - self.busy, self.n * self.slots - self.placed)

    def slot_free(self, pool: object) -> int:
        return self.n * self.slots - self.placed

    def capacity(self, pool: object) -> int:
        return self.n * self.slots

    def room_capacity(self, pool: object) -> int:
        return self.n

    def start(self, g: Grant) -> Grant:
        g.started()
        self.placed += 1
        self.busy += 1
        return g

    def first_token(self, q: FairQueue, g: Grant) -> None:
        self.busy -= 1
        g.prefilled()
        q.pump()


async def test_under_the_dispatch_gate_a_tenant_filling_the_prefill_queues_is_above_its_share(
) -> None:
    pool = GatedPool(4, 4)  # 16 slots, 4 starts at once; reserve ceil(0.25 × 4) = 1 start
    q = FairQueue(pool.free, capacity=pool.capacity, room_capacity=pool.room_capacity,
                  slot_room=pool.slot_free, reserve_fraction=0.25, active_window_s=2.0,
                  clock=lambda: 0.0)
    b = pool.start(await q.acquire("b", "standard", "p", 10, 5.0))
    pool.first_token(q, b)
    a = [pool.start(await q.acquire("a", "standard", "p", 10, 5.0)) for _ in range(3)]
    # a holds 3 slots (share 8) but 3 prompts prefilling (share 4 ÷ 2 = 2): the last free
    # start is the reserve, kept for b
    waiting = asyncio.create_task(q.acquire("a", "standard", "p", 10, 5.0))
    await asyncio.sleep(0)
    assert not waiting.done() and q.room("p") == 1
    light = pool.start(await q.acquire("b", "standard", "p", 10, 0.5))  # no wait
    assert light.waited_s == 0.0 and q.room("p") == 0
    pool.first_token(q, light)  # a start frees, but a still has 3 prefilling: reserved
    await asyncio.sleep(0)
    assert not waiting.done()
    pool.first_token(q, a[0])  # a has 2 prefilling, 2 starts free: above the reserve
    g = pool.start(await asyncio.wait_for(waiting, 1.0))
    assert g.tenant == "a" and q.held("p", "a") == 4
    g.release()
    assert not g.prefilling  # release ends the prefill count too (idempotent)


async def test_under_the_gate_the_headroom_keeps_the_last_starts_for_the_bands_above() -> None:
    pool = GatedPool(8, 4)  # 8 starts at once; ceil((1 - 0.7) × 8) = 3 kept for the top bands
    q = FairQueue(pool.free, capacity=None, room_capacity=pool.room_capacity,
                  slot_room=pool.slot_free, envelope=pool.capacity, shed_above=0.7,
                  clock=lambda: 0.0)
    assert [q.starts_kept(b, "p", 3) for b in ("standard", "sheddable", "batch")] == [
        False, True, True]
    assert not q.starts_kept("batch", "p", 4)
    low = [pool.start(await q.acquire("a", band, "p", 10, 5.0))
           for band in ("sheddable", "batch", "sheddable", "batch", "batch")]
    assert q.room("p") == 3
    shed = asyncio.create_task(q.acquire("a", "sheddable", "p", 10, 5.0))
    batch = asyncio.create_task(q.acquire("a", "batch", "p", 10, 5.0))
    await asyncio.sleep(0)
    assert not shed.done() and not batch.done()  # they wait (not shed) for a start beyond 3
    assert q.waiting == 2 and q.depth("sheddable") == 1 and q.depth("batch") == 1
    top = [pool.start(await q.acquire("a", "standard", "p", 10, 5.0)) for _ in range(3)]
    assert all(g.waited_s == 0.0 for g in top) and q.room("p") == 0
    pool.first_token(q, low[0])  # one start frees: still one of the last three
    await asyncio.sleep(0)
    assert not shed.done() and not batch.done()
    for g in top:
        pool.first_token(q, g)  # four free: the sheddable request (the higher band) goes
    g = pool.start(await asyncio.wait_for(shed, 1.0))
    assert g.tenant == "a" and not batch.done()
    batch.cancel()
    await asyncio.gather(batch, return_exceptions=True)


async def test_under_the_gate_a_single_endpoint_pool_keeps_no_start() -> None:
    pool = GatedPool(1, 4)
    q = FairQueue(pool.free, capacity=None, room_capacity=pool.room_capacity,
                  slot_room=pool.slot_free, envelope=pool.capacity, shed_above=0.7,
                  clock=lambda: 0.0)
    assert not q.starts_kept("batch", "p", 1)
    g = pool.start(await q.acquire("a", "batch", "p", 10, 5.0))
    assert g.waited_s == 0.0


def test_the_starts_kept_are_a_fraction_of_room_capacity_not_of_endpoints() -> None:
    """Two gated endpoints (1 start each) and one without a physics model (never gated, its 64
    slots are starts): the pool can start 66 at once, so ceil(0.3 × 66) = 20 are kept, not
    ceil(0.3 × 3) = 1."""
    q = FairQueue(lambda pool: 66, capacity=None, room_capacity=lambda pool: 2 + 64,
                  slot_room=lambda pool: 2 * 4 + 64, envelope=lambda pool: 2 * 4 + 64,
                  shed_above=0.7, clock=lambda: 0.0)
    assert q.starts_kept("batch", "p", 20) and q.starts_kept("sheddable", "p", 20)
    assert not q.starts_kept("batch", "p", 21)
    assert not q.starts_kept("standard", "p", 1)
