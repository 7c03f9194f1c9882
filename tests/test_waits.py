"""`waits.wait_woken` keeps a cancellation that arrives in the turn its event is set, where
Python 3.11's ``asyncio.wait_for`` returns instead (CPython gh-86296): a batch worker or a
PostgreSQL ledger flusher looping on it would then never stop, and a gateway's shutdown hang."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable

import pytest

from inferplane.waits import stop_task, wait_woken


async def _loop_cancelled_as_woken(wait: Callable[[asyncio.Event], Awaitable[object]]) -> bool:
    """A ``while True: wait`` loop cancelled in the turn its event is set; True when the
    cancellation ended it."""
    event = asyncio.Event()
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while rounds < 5:  # bounded: a lost cancellation ends the loop after a few timeouts
            rounds += 1
            await wait(event)
            event.clear()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)  # the loop waits
    event.set()  # its wait completes ...
    await asyncio.sleep(0)
    task.cancel()  # ... and the stop comes in the same turn
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    return task.cancelled()


async def test_wait_woken_keeps_a_cancellation_that_comes_as_it_is_woken() -> None:
    assert await _loop_cancelled_as_woken(lambda e: wait_woken(e, 0.05))


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for keeps it from 3.12 on")
async def test_wait_for_loses_it_on_311() -> None:
    # the control: the pattern wait_woken replaced (batch worker, PostgreSQL ledger) lost it
    async def old(event: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), 0.05)

    assert not await _loop_cancelled_as_woken(old)


async def test_wait_woken_says_whether_it_was_woken() -> None:
    event = asyncio.Event()
    assert await wait_woken(event, 0.01) is False
    event.set()
    assert await wait_woken(event, 10) is True


# -- one-shot waits: a cancellation that arrives in the turn the wait completes is kept -------
# (with wait_for on 3.11 the cancelled task returned as if nothing happened and went on: a
# request whose client had gone kept its slot and was sent upstream)


async def _cancelled_as_completed(start: Awaitable[object], complete: Callable[[], None]) -> bool:
    """Start ``start`` in a task, let it wait, complete its wait and cancel it in one turn; True
    when the task ended cancelled."""
    task = asyncio.ensure_future(start)
    await asyncio.sleep(0)  # it waits
    complete()
    task.cancel()  # in the same turn
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    return task.cancelled()


async def test_admission_queue_keeps_a_cancellation_that_comes_with_the_grant() -> None:
    from inferplane.admission.queue import FairQueue

    room = [0]
    q = FairQueue(lambda pool: room[0], clock=lambda: 0.0)

    def grant() -> None:
        room[0] = 1
        q.pump()

    assert await _cancelled_as_completed(q.acquire("a", "standard", "p", 10, 5.0), grant)
    # the grant it was given went back: the slot is free and nothing is charged
    assert q.room("p") == 1 and q.held("p", "a") == 0 and q.waiting == 0
    assert q.vtc.get("a", 0.0) == 0.0


async def test_shared_slots_wait_keeps_a_cancellation_that_comes_with_a_release() -> None:
    from inferplane.admission.slots import SharedSlots

    # never connects: only the in-process waiters are used
    slots = SharedSlots("redis://127.0.0.1:9", "t", limits={"e": 1}, on_remote=lambda n, c: None)
    try:
        assert await _cancelled_as_completed(slots.wait_free(5.0), lambda: slots._wake(1))
    finally:
        await slots.r.aclose()


async def test_receipt_durable_keeps_a_cancellation_that_comes_with_the_commit() -> None:
    from inferplane.ledger.record import Receipt

    future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    receipt = Receipt("h", future)
    assert await _cancelled_as_completed(receipt.durable(5.0), lambda: future.set_result(True))


# -- stopping a loop whose library swallows a cancellation --------------------------------------


async def test_stop_task_stops_a_loop_that_swallows_a_cancellation() -> None:
    swallowed = 0

    async def loop() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.001)
            except asyncio.CancelledError:
                if swallowed == 2:
                    raise
                swallowed += 1  # the first two, as redis-py does now and then (inferplane.waits)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.005)
    stopper = asyncio.create_task(stop_task(task))
    # it goes on cancelling while the loop runs; bounded here so a regression fails, not hangs
    done, _ = await asyncio.wait({stopper}, timeout=30)
    assert stopper in done and stopper.exception() is None
    assert task.cancelled() and swallowed == 2


async def test_stop_task_returns_what_the_task_ended_with() -> None:
    async def fails() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise RuntimeError("clean-up failed") from None

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    exc = await stop_task(task)
    assert isinstance(exc, RuntimeError) and str(exc) == "clean-up failed"
    assert await stop_task(None) is None  # nothing to stop
    done = asyncio.create_task(asyncio.sleep(0))
    await done
    assert await stop_task(done) is None  # already ended well



async def test_shared_slots_wake_goes_on_when_its_waiter_is_cancelled() -> None:
    from inferplane.admission.slots import SharedSlots

    slots = SharedSlots("redis://127.0.0.1:9", "t", limits={"e": 1}, on_remote=lambda n, c: None)
    try:
        first = asyncio.create_task(slots.wait_free(30))
        second = asyncio.create_task(slots.wait_free(30))
        await asyncio.sleep(0)  # both wait
        slots._wake(1)  # a slot freed: the first is woken ...
        first.cancel()  # ... and cancelled in the same turn
        with contextlib.suppress(asyncio.CancelledError):
            await first
        assert first.cancelled()
        for _ in range(5):
            await asyncio.sleep(0)
        assert second.done()  # the wake went on to it (before: it slept until its timeout)
    finally:
        await slots.r.aclose()
