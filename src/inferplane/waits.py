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


async def wait_woken(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` passed; True when it was set. A cancellation
    of the waiting task is never lost (see the module's docstring)."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True
