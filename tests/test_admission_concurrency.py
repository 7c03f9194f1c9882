"""The overspend bound under concurrency: 100 clients racing on one budget, in memory and in
Redis shared by two store instances (two replicas)."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator

import pytest

from inferplane.admission.budget import Budgets
from inferplane.admission.state import AdmissionStore, MemoryStore
from inferplane.config.schema import BudgetSpec, TenantSpec
from inferplane.errors import BudgetExceededError

REDIS_URL = "redis://127.0.0.1:6379/0"
H = "sha256:" + "cd" * 32
LIMIT = 0.5
RESERVE = 0.013


def redis_reachable() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=0.5).ping())
    except Exception:
        return False


async def race(stores: list[AdmissionStore], clients: int = 100) -> tuple[int, float]:
    """Each client reserves the worst case, waits, settles a random actual ≤ worst case + 10 %.
    Returns (admitted, spent) with the spend read back from the store."""
    t = TenantSpec(name="t", api_keys=[H],
                   budgets=[BudgetSpec(scope="tenant", window="day", usd=LIMIT)])
    rng = random.Random(7)
    admitted = 0
    now = 1_700_000_000.0

    async def client(i: int) -> None:
        nonlocal admitted
        b = Budgets(stores[i % len(stores)], lease_ttl_s=600)
        await asyncio.sleep(rng.random() * 0.01)
        try:
            lease = await b.reserve(t, H, None, RESERVE, 13, f"lease-{i}", now)
        except BudgetExceededError:
            return
        admitted += 1
        await asyncio.sleep(rng.random() * 0.02)
        await b.settle(lease, RESERVE * rng.uniform(0.5, 1.1), 12, now)

    await asyncio.gather(*(client(i) for i in range(clients)))
    key = Budgets(stores[0], 600).counters(t, H, None, 0, 0, now)[0][1].key
    st = await stores[0].counter(key, now)
    assert st.reserved_usd == pytest.approx(0.0, abs=1e-9)  # every lease settled
    return admitted, st.spent_usd


async def test_memory_overspend_bound() -> None:
    admitted, spent = await race([MemoryStore()])
    assert 0 < admitted < 100
    assert spent <= LIMIT + RESERVE


@pytest.fixture
async def redis_stores() -> AsyncIterator[list[AdmissionStore]]:
    if not redis_reachable():
        pytest.skip(f"Redis not reachable at {REDIS_URL}")
    from inferplane.admission.redis_state import RedisStore

    prefix = f"inferplane-test-{os.getpid()}-{random.randrange(1 << 30)}:"
    # a generous call timeout: this test is about the overspend bound, not about outages, and
    # 100 clients on a loaded 2-core machine can wait longer than the 0.5 s default
    stores = [RedisStore(REDIS_URL, prefix, 5.0), RedisStore(REDIS_URL, prefix, 5.0)]
    yield list(stores)
    keys = [k async for k in stores[0].r.scan_iter(match=prefix + "*")]
    if keys:
        await stores[0].r.delete(*keys)
    for s in stores:
        await s.close()


async def test_redis_overspend_bound_across_two_replicas(
    redis_stores: list[AdmissionStore],
) -> None:
    admitted, spent = await race(redis_stores)
    assert 0 < admitted < 100
    assert spent <= LIMIT + RESERVE


async def test_redis_lease_expiry_and_buckets(redis_stores: list[AdmissionStore]) -> None:
    from inferplane.admission.state import BucketDemand, CounterDemand

    s = redis_stores[0]
    d = CounterDemand("c", 1.0, None, 0.6, 0, 3600.0)
    assert await s.reserve([d], "a", 100.0, 0.0) == -1
    assert await s.reserve([d], "b", 199.0, 99.0) == 0
    assert await s.reserve([d], "b", 200.0, 100.0) == -1  # lease "a" expired at 100
    await s.settle([d], "b", 0.25, 3, 101.0)
    st = await s.counter("c", 101.0)
    assert (st.spent_usd, st.spent_tokens, st.reserved_usd) == (0.25, 3, 0.0)
    rpm = BucketDemand("r", 2, 2 / 60, 1)
    assert await s.take([rpm], 0.0) == 0 and await s.take([rpm], 0.0) == 0
    assert await s.take([rpm], 0.0) == pytest.approx(30.0)
    assert await s.take([rpm], 30.0) == 0
    assert not await s.marked("k", 0)
    await s.mark("k", 10, 0)
    assert await s.marked("k", 0)
    await s.mark("k", 10, 0)
    await s.unmark("k")
    assert not await s.marked("k", 0)
    assert [await s.incr("i", 10, 0) for _ in range(3)] == [1, 2, 3]
    await s.add_usage("t", ("d", "wf", "m", "c", "k"), 0.5, 7, 5)
    await s.add_usage("t", ("d", "wf", "m", "c", "k"), 0.25, 7, 5)
    rows = await s.usage("t")
    assert len(rows) == 1 and rows[0].usd == 0.75 and rows[0].requests == 2
