"""`waits.wait_woken` keeps a cancellation that arrives in the turn its event is set, where
Python 3.11's ``asyncio.wait_for`` returns instead (CPython gh-86296): a batch worker or a
PostgreSQL ledger flusher looping on it would then never stop, and a gateway's shutdown hang."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable

import pytest

from inferplane.waits import wait_woken


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
