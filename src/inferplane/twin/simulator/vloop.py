"""An asyncio event loop on virtual time: the simulator's scheduler.

The gateway's code waits the asyncio way (admission queue futures, ``asyncio.timeout``
deadlines, ``asyncio.sleep`` tickers, ``loop.call_later`` timers). Running that code unchanged on
a virtual clock needs only a loop whose ``time()`` is virtual and which, instead of sleeping until
its next timer, jumps to it: :class:`VirtualTimeLoop`. Everything scheduled runs in the order the
stock loop would run it, at the virtual instant it was scheduled for, as fast as the CPU allows.

There is no real I/O in a simulation: a loop with nothing ready and nothing scheduled while its
main coroutine still waits is stuck for good, and says so (`VirtualLoopStuck`) instead of
blocking forever.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any

__all__ = ["VirtualLoopStuck", "VirtualTimeLoop"]


class VirtualLoopStuck(RuntimeError):
    """Nothing is ready or scheduled, yet the simulation waits: a bug, never a user error."""


_POLL_EVERY = 1024
"""Loop iterations between two real polls of the selector (see `_JumpingSelector.select`)."""


class _JumpingSelector(selectors.DefaultSelector):
    """A selector whose wait advances the loop's virtual clock instead of sleeping.

    A simulation does no I/O: the only file the loop registers is its self-pipe, which
    ``call_soon_threadsafe`` writes to wake a sleeping loop — and the callback it wakes the
    loop for is already in the ready queue, which runs whether or not the pipe is read. So
    the selector polls the operating system only every `_POLL_EVERY` iterations (to drain
    that pipe), not once per iteration: the poll was a system call per simulated event.
    """

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualTimeLoop | None = None
        self._skipped = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        loop = self.loop
        assert loop is not None
        if timeout is None:
            raise VirtualLoopStuck("the simulation waits on nothing that is scheduled")
        if timeout > 0:
            loop.advance(timeout)
        self._skipped += 1
        if self._skipped < _POLL_EVERY:
            return []
        self._skipped = 0
        return super().select(0)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock is virtual seconds, starting at ``start``."""

    def __init__(self, start: float = 0.0) -> None:
        self._virtual_now = start
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        return self._virtual_now

    def busy_now(self) -> bool:
        """Callbacks are ready to run at this instant (a task woken, a timer due now)."""
        return bool(self._ready)  # type: ignore[attr-defined]

    def advance(self, seconds: float) -> None:
        """Move the clock forward (only the loop itself does, when it would otherwise sleep)."""
        self._virtual_now += seconds

    def run(self, main: Any) -> Any:
        """Run ``main`` (a coroutine) to completion on virtual time; then close the loop."""
        try:
            return self.run_until_complete(main)
        finally:
            try:
                left = asyncio.all_tasks(self)
                for task in left:
                    task.cancel()
                if left:
                    self.run_until_complete(asyncio.gather(*left, return_exceptions=True))
                self.run_until_complete(self.shutdown_asyncgens())
            finally:
                self.close()
