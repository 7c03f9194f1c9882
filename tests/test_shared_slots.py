"""`SharedSlots` against a private redis-server: the limit across two processes' views, leases
that end without renewal, and renewal that keeps them."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from inferplane.admission.slots import SharedSlots
from tests.support.redis_server import RedisServer


def _slots(url: str, remote: dict[str, int], lease_s: float = 0.6) -> SharedSlots:
    return SharedSlots(url, "s:", limits={"e": 2, "f": 1}, on_remote=remote.__setitem__,
                       lease_s=lease_s, sync_s=0.05, timeout_s=0.3, retry_after_s=0.3)


async def test_limit_and_leases(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path)
    seen_a: dict[str, int] = {}
    seen_b: dict[str, int] = {}
    a, b = _slots(srv.url, seen_a), _slots(srv.url, seen_b)
    try:
        # a hang must fail the test, not stall the suite
        await asyncio.wait_for(_scenario(a, b, seen_a, seen_b), 30)
    finally:
        await asyncio.wait_for(a.close(), 10)
        await asyncio.wait_for(b.close(), 10)
        srv.stop()


async def _scenario(
    a: SharedSlots, b: SharedSlots, seen_a: dict[str, int], seen_b: dict[str, int]
) -> None:
    await a.start()
    await b.start()
    s1 = await a.acquire("e")
    s2 = await b.acquire("e")
    assert s1 and s2
    assert await a.acquire("e") is None and await b.acquire("e") is None  # 2 across both
    assert seen_a["e"] == 1 and seen_b["e"] == 1  # each sees the other's slot
    assert await a.acquire("nope") is None
    a.release("e", s1)
    a.release("e", s1)  # idempotent
    await asyncio.sleep(0.02)
    s3 = await b.acquire("e")
    assert s3 is not None
    b.release("e", s2)
    b.release("e", s3)
    # leases: a process that stops renewing loses its slots once its lease ends (polled, not
    # timed: on a loaded machine Redis itself may run the last renewal late)
    f1 = await a.acquire("f")
    assert f1 is not None and await b.acquire("f") is None
    assert a._loop is not None
    a._loop.cancel()  # a frozen (or killed) process: no more renewals
    await asyncio.sleep(0.6)  # one lease
    while (f2 := await b.acquire("f")) is None:
        await asyncio.sleep(0.05)  # bounded by the scenario's 30 s
    await a.renew()  # a's renewal comes too late: its slot had lapsed, and it says so ...
    assert a.lapsed == 1 and b.lapsed == 0
    # ... and puts it back: its request still runs, every replica counts it again
    assert await a.r.zscore("s:e:f", f1) is not None
    assert await a.r.zcard("s:e:f") == 2  # over the limit of 1 until one of them ends
    # renewals keep a live holder's slot past its lease
    await asyncio.sleep(0.9)
    assert await a.acquire("f") is None
    b.release("f", f2)


async def test_close_returns_when_redis_py_swallows_the_loops_cancellation(tmp_path: Path) -> None:
    """The hang seen in a test's gateway clean-up (session 11): close cancelled the sync loop
    while one of its Redis calls was in flight, redis-py (with the client's old socket_timeout)
    lost the cancellation and close waited on a loop that ran on. 40 starts and closes at random
    points of the loop's Redis calls; with the old client and close about one in six hung."""
    srv = RedisServer(tmp_path)
    rng = random.Random(11)
    try:
        for i in range(40):
            slots = SharedSlots(srv.url, f"close-{i}:", limits={"e": 2},
                                on_remote=lambda n, c: None, sync_s=0.001)
            await slots.start()
            await asyncio.sleep(rng.random() * 0.02)
            closing = asyncio.create_task(slots.close())
            done, _ = await asyncio.wait({closing}, timeout=30)  # a hang guard, not a timing
            assert closing in done, f"close {i} did not return: its sync loop ran on"
            assert closing.exception() is None
    finally:
        srv.stop()
