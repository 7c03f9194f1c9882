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


async def stop_task(task: asyncio.Task[Any] | None) -> BaseException | None:
    """Cancel ``task`` and wait until it has ended, cancelling it again every
    `STOP_RECANCEL_S` while it runs on. Returns the error the task ended with (None when it
    was cancelled or returned): the caller logs it and goes on with its own clean-up.

    For the background loops that call Redis: redis-py (8.2.0, the pinned version) loses a
    cancellation that arrives while an asyncio command is in flight, now and then. One path is
    known: with a ``socket_timeout`` on the client it sends under ``asyncio.wait_for``, which on
    Python 3.11 loses a cancellation that arrives as the send completes (the bug `wait_woken`
    avoids). Without one it still lost 8 of 60 (commands 1 ms apart) and most in a tight loop of
    commands (session 11; where, not found). A loop around such a call then runs on after its
    cancellation, and the stop awaiting it hangs, as a test's in-process gateway did in
    ``SharedSlots.close``. A clean-up that the task runs after a cancellation is cancelled again
    if it takes longer than `STOP_RECANCEL_S` (redis-py's ``PubSub.aclose`` finishes under
    repeated cancellations)."""
    if task is None:
        return None
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_RECANCEL_S)
    return None if task.cancelled() else task.exception()
