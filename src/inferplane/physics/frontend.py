"""An engine's front end as one server: requests in and tokens out, one piece of work at a time.

vLLM's API server is one Python process: it parses and tokenises every request before the
scheduler sees it, and turns what the engine produces into stream chunks. When it is the
bottleneck (a CPU engine, a tiny model, a starved machine) work queues in front of it: a burst of
requests reaches the engine one intake apart, and a request that arrives while other streams are
busy waits for their chunks to be sent first. :class:`FrontEnd` keeps that queue on whatever
clock its caller uses (the emulator's engine time, the simulator's virtual time), first come,
first served: ``frontend_request_s`` of work per request taken in, ``frontend_token_s`` per
stream chunk sent (:class:`~inferplane.physics.hardware.HardwareProfile`).

A request's intake is two pieces of work, not one. The API server is an asyncio event loop: a
request's handler runs until its first ``await`` that waits (HTTP body and validation, up to
handing the prompt to the tokenizer), and what follows (the prompt's processing and the hand-off
to the engine core, ``frontend_handoff_s``) is queued again *behind whatever became ready
meanwhile* — the first pieces of the other requests of a burst. So a burst of ``N`` sent at once
reaches the engine after all ``N`` first pieces: the first request up to ``N ×
frontend_request_s + frontend_handoff_s`` late, each other one when its own wait is over or
behind the hand-off ahead of it, whichever is later (one ``frontend_handoff_s`` apart while the
waits end before those hand-offs do): vLLM's first answer to a burst comes late and the rest
close behind it. With
``frontend_handoff_s = 0`` it is the one-piece intake.

The callers (the emulator, the simulator, ``physics.calibration.predict_burst_s``) queue the
second piece after the request's parallel wait (``request_overhead_s``: the tokeniser's thread,
the hops between processes), not right after the first piece: the wait is what lies between the
two pieces in vLLM's handler, and requests that arrive *after* this one — a closed loop's
successors, sent as the streams before them end — get their first pieces in ahead of its
hand-off if they arrive before the wait is over. On the fidelity vLLM a long prompt sent one
decode step before three others came 8.6 ms later than alone (35.3 against 26.7 ms, medians of
12 rounds: docs/benchmarks.md, session 15);
with the hand-off right after the first piece nothing that arrived later could delay it.

Chunks coalesce as vLLM's do: tokens a step produces while the previous step's chunks are still
waiting to be sent join them (vLLM merges a request's pending outputs into one), so a front end
that falls behind sends fewer, larger chunks instead of an ever longer queue — the "whole stream
in one burst" of a starved engine.

It never reads a clock and never sleeps: each call returns the time at which that piece of work
is done, and the caller waits until then.
"""

from __future__ import annotations

from collections import deque


class FrontEnd:
    """A first-come-first-served single server; ``free_at`` is when its queued work ends.

    Calls must come in time order. A caller that knows when future tokens will be produced (the
    simulator, which computes a run of steps at once) may :meth:`announce` them ahead: they are
    queued at their own times, before any later intake.
    """

    __slots__ = (
        "_emit_end", "_emit_start", "_later", "free_at", "handoff_s", "request_s", "token_s"
    )

    def __init__(
        self, request_s: float = 0.0, token_s: float = 0.0, handoff_s: float = 0.0
    ) -> None:
        if request_s < 0 or token_s < 0 or handoff_s < 0:
            raise ValueError("front-end service times must be >= 0")
        self.request_s = request_s
        self.token_s = token_s
        self.handoff_s = handoff_s
        self.free_at = 0.0
        self._emit_start = self._emit_end = -1.0  # the last emission queued
        self._later: deque[tuple[float, int]] = deque()  # announced (time, streams)

    @property
    def enabled(self) -> bool:
        return self.request_s > 0 or self.token_s > 0 or self.handoff_s > 0

    def reset(self) -> None:
        """Idle, nothing queued (a restarted engine)."""
        self.free_at = 0.0
        self._emit_start = self._emit_end = -1.0
        self._later.clear()

    def _catch_up(self, now: float) -> None:
        later = self._later
        while later and later[0][0] <= now:
            at, streams = later.popleft()
            self._emit(at, streams)

    def _emit(self, at: float, streams: int) -> float:
        if at < self._emit_start and self.free_at == self._emit_end:
            return self._emit_end  # its chunks are still queued, last in line: join them
        start = at if at > self.free_at else self.free_at
        self._emit_start, self._emit_end = start, start + streams * self.token_s
        self.free_at = self._emit_end
        return self.free_at

    def intake(self, now: float) -> float:
        """A request arrives at ``now``: when its first piece of work is done. Without a
        ``handoff_s`` it has then reached the engine; with one, call :meth:`handoff` at that
        time (after every call with an earlier time)."""
        return self._work(now, self.request_s)

    def handoff(self, now: float) -> float:
        """A request whose first piece (and the wait after it) was done at ``now`` queues its
        second (``handoff_s``) behind everything queued until then: when it is done."""
        return self._work(now, self.handoff_s)

    def _work(self, now: float, seconds: float) -> float:
        self._catch_up(now)
        if seconds <= 0:
            return now
        start = now if now > self.free_at else self.free_at
        self.free_at = start + seconds
        return self.free_at

    def emit(self, now: float, streams: int) -> float:
        """The engine produced tokens for ``streams`` requests at ``now``: when they have been
        sent (with chunks already queued, if they join them)."""
        self._catch_up(now)
        if self.token_s <= 0 or streams <= 0:
            return now
        return self._emit(now, streams)

    def announce(self, at: float, streams: int) -> None:
        """Tokens for ``streams`` requests will be produced at ``at`` (not before any earlier
        call's time): :meth:`emit` them then."""
        if self.token_s > 0 and streams > 0:
            self._later.append((at, streams))

    def backlog_s(self, now: float) -> float:
        """Work queued ahead of anything that arrives at ``now``."""
        self._catch_up(now)
        return self.free_at - now if self.free_at > now else 0.0
