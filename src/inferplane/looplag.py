"""Event-loop lag: how long this process could not run its own callbacks, and deadlines that
do not count it.

A gateway on a loaded host is descheduled, or its loop is held up, for a while now and then.
A timeout that fires because the gateway itself was not running blames the other side for the
gateway's own lag: a first-byte timeout ejects a healthy engine, a health probe marks it down.

`LoopLag` runs one ticker task that sleeps ``interval_s`` at a time and adds how late each tick
woke up to ``lost_s``, the seconds this loop ran late since it started; `lost_at` also counts the
lateness of a tick that is due but has not run yet, so a callback that runs in the same loop
iteration as a late tick already sees the stall. A ticker cancelled before that tick ran (`stop`,
or the loop's shutdown cancelling its tasks) books the pending lateness into ``lost_s``, so
`lost_at` never goes down (``inferplane_event_loop_lag_seconds_total`` is a counter).

`LoopLag.deadline` is `asyncio.timeout` measured in *running time*: when ``seconds`` of wall time
have passed it subtracts the lag lost since it was entered and re-arms itself for what is left;
it expires only once ``seconds`` of wall time minus lag have passed (and at the latest at
``max_s`` of wall time). Without a running ticker it is exactly ``asyncio.timeout(seconds)``.

`bounded` is the form the gateway's own I/O uses (engine scrapes and health probes, Redis
calls): ``seconds`` of running time, and never more than ``max_stretch × seconds`` of wall time
(``gateway.lag_max_stretch``, default `MAX_STRETCH`), so a loop that is merely busy still
times out a peer that does not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from types import TracebackType

RECENT_S = 60.0  # `recent_max_s` looks this far back

MAX_STRETCH = 3.0
"""The default bound on a deadline's stretch: it fires by this multiple of itself in wall time
however much the loop lagged (``gateway.lag_max_stretch``,
``gateway.first_byte_timeout.max_stretch``)."""


class LoopLag:
    """The event loop's lag, measured by a ticker task (`start` / `stop`)."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.lost_s = 0.0  # Σ lateness of the ticks so far
        self.ticks = 0
        self.last_s = 0.0  # lateness of the last tick
        self._due: float | None = None  # when the pending tick should run (None: not running)
        self._recent: deque[tuple[float, float]] = deque()  # (time, lateness) over RECENT_S
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._due = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._due = due = loop.time() + self.interval_s
                await asyncio.sleep(self.interval_s)
                now = loop.time()
                self.tick(now - due, now)
        except asyncio.CancelledError:
            # the tick due has not run: book what `lost_at` counted of it until now, so the
            # total does not drop once the ticker no longer runs (a lateness, not a tick)
            pending, now = self._due, loop.time()
            if pending is not None and now > pending:
                self.lost_s += now - pending
            self._due = None
            raise

    def tick(self, late_s: float, now: float) -> None:
        """Account one tick that ran ``late_s`` after it was due (the ticker calls it)."""
        late = max(0.0, late_s)
        self.lost_s += late
        self.last_s = late
        self.ticks += 1
        recent = self._recent
        if late > 0.001:
            recent.append((now, late))
        while recent and recent[0][0] < now - RECENT_S:
            recent.popleft()

    def lost_at(self, now: float) -> float:
        """Seconds lost to lag up to ``now`` (the loop's clock), the pending tick included."""
        due = self._due
        if due is None or now <= due or not self.running:  # a stopped ticker adds nothing
            return self.lost_s
        return self.lost_s + (now - due)

    def lost_now(self) -> float:
        """`lost_at` the running loop's time now; outside a running loop, ``lost_s`` (what
        ``inferplane_event_loop_lag_seconds_total`` exports). It never goes down when read on
        the ticker's loop; a read from another thread while the ticker runs sees only the
        ticks booked so far (nothing collects from another thread)."""
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:
            return self.lost_s
        return self.lost_at(now)

    def mark(self) -> tuple[float, float]:
        """(loop time, lost so far) now: the start of a span `ran_s` measures."""
        now = asyncio.get_running_loop().time()
        return now, self.lost_at(now)

    def ran_s(self, mark: tuple[float, float]) -> float:
        """Running time since ``mark`` (wall time less the lag lost in between)."""
        now = asyncio.get_running_loop().time()
        return (now - mark[0]) - (self.lost_at(now) - mark[1])

    def recent_max_s(self, now: float) -> float:
        """The worst tick lateness in the last `RECENT_S` seconds."""
        return max((late for t, late in self._recent if t >= now - RECENT_S), default=0.0)

    def deadline(self, seconds: float, max_s: float | None = None) -> LagDeadline:
        """`asyncio.timeout` that counts only running time (module docstring). ``max_s``: the
        most wall time it may take, lag or not (default: no bound beyond the lag itself)."""
        return LagDeadline(self, seconds, max_s)


class LagDeadline:
    """`LoopLag.deadline`'s context manager (a class: the request path enters two a request,
    and a generator-based one cost ~1.4 times as much: 16.0 against 11.5 µs to enter and
    leave). Entering it enters an ``asyncio.timeout(None)`` (what it yields) and arms a check
    at ``seconds``: it subtracts the lag lost since entry and re-arms itself for what is left,
    or expires the timeout once nothing is left or ``max_s`` of wall time has passed. Leaving
    it cancels the pending check, then leaves the timeout."""

    __slots__ = ("_cap", "_cm", "_handle", "_lag", "_loop", "_lost0", "_max_s", "_seconds",
                 "_start")

    def __init__(self, lag: LoopLag, seconds: float, max_s: float | None = None) -> None:
        self._lag = lag
        self._seconds = seconds
        self._max_s = max_s
        self._handle: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> asyncio.Timeout:
        loop = self._loop = asyncio.get_running_loop()
        seconds, max_s = self._seconds, self._max_s
        self._start = start = loop.time()
        self._lost0 = self._lag.lost_at(start)
        self._cap = start + (math.inf if max_s is None else max(max_s, seconds))
        cm = self._cm = asyncio.timeout(None)
        await cm.__aenter__()
        self._handle = loop.call_at(start + seconds, self._check)
        return cm

    def _check(self) -> None:
        now = self._loop.time()
        left = self._seconds - ((now - self._start) - (self._lag.lost_at(now) - self._lost0))
        if left <= 0 or now >= self._cap:
            self._handle = None
            self._cm.reschedule(now)  # expire: the block is cancelled → TimeoutError
        else:
            self._handle = self._loop.call_at(min(now + left, self._cap), self._check)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        await self._cm.__aexit__(exc_type, exc, tb)


def bounded(
    lag: LoopLag | None, seconds: float, max_stretch: float = MAX_STRETCH
) -> contextlib.AbstractAsyncContextManager[object]:
    """A deadline of ``seconds`` of running time (`LoopLag.deadline`) that fires by
    ``max_stretch × seconds`` of wall time in any case; without ``lag``, exactly
    ``asyncio.timeout(seconds)``."""
    if lag is None:
        return asyncio.timeout(seconds)
    return lag.deadline(seconds, max(1.0, max_stretch) * seconds)
