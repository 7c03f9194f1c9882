"""Log lines that a failing dependency cannot turn into a flood.

`LogLimiter` lets one line per key (an endpoint's name) through every ``interval_s`` and
counts the rest; the next line that goes through says how many were left out since the last
one. A dead engine that fails every request leaves one WARNING per ``interval_s`` (with the
count of the attempts in between), not one per request, and the first failure is always logged
at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

#: one line per endpoint per this many seconds (`LogLimiter`'s default)
INTERVAL_S = 30.0


class LogLimiter:
    """``warn(key, msg, *args)`` logs at most once per ``interval_s`` per key."""

    __slots__ = ("_clock", "_last", "_left_out", "interval_s", "log")

    def __init__(
        self,
        log: logging.Logger,
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def warn(self, key: str, msg: str, *args: object, level: int = logging.WARNING) -> bool:
        """Log ``msg % args`` at ``level`` (WARNING) unless ``key`` had a line less than
        ``interval_s`` ago (then count it); True when it was logged."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return False
        self._last[key] = now
        n = self._left_out.pop(key, 0)
        if n:
            msg += " (%d more like it on %s in the last %.0f s not logged)"
            args = (*args, n, key, now - last if last is not None else 0.0)
        if level == logging.WARNING:
            self.log.warning(msg, *args)
        else:
            self.log.log(level, msg, *args)
        return True
