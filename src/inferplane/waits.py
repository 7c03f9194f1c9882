"""Waiting for an event with a timeout in a loop that must stop when its task is cancelled.

``asyncio.wait_for(event.wait(), timeout)`` cannot be used for that on Python 3.11: when the
task is cancelled in the same turn of the loop that the event is set, ``wait_for`` sees the inner
wait done and returns its result instead of raising ``CancelledError`` (CPython gh-86296, fixed
in 3.12 by building ``wait_for`` on ``asyncio.timeout``). A loop of ``while True: wait, work``
then carries on and the ``await task`` (or ``gather``) of whoever stopped it never returns — a
gateway's shutdown that hangs with an idle event loop, as the batch worker's did in a CI run and
under ``serve --workers`` (session 10). ``asyncio.timeout`` keeps the cancellation.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def wait_woken(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` passed; True when it was set. A cancellation
    of the waiting task is never lost (see the module's docstring)."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


STOP_RECANCEL_S = 0.1
"""How often `stop_task` cancels again a task that runs on after a cancellation."""


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling it again every
    `STOP_RECANCEL_S` while it runs on; a task that ended with an error raises it here.

    For the background loops that call Redis: redis-py (8.2.0 here) swallows a cancellation that
    arrives while an asyncio command is in flight, about one in six such cancellations (session
    11: a plain ``await r.zcard(k)`` in a loop, cancelled at random, ran on after 50 of 300
    cancellations). A ``while True`` loop around such a call then never stops, and the shutdown
    awaiting it hangs, as a test's in-process gateway did in ``SharedSlots.close``. Only for
    loops with no clean-up of their own to finish after a cancellation: the next cancellation
    would cut it short."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_RECANCEL_S)
    if not task.cancelled() and (exc := task.exception()) is not None:
        raise exc
