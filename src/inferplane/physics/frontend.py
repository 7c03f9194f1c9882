"""An engine's front end as one server: requests in and tokens out, its time shared.

vLLM's API server is one Python process: it parses and tokenises every request before the
scheduler sees it, and turns what the engine produces into stream chunks. When it is the
bottleneck (a CPU engine, a tiny model, a starved machine) its work piles up: a burst of requests
reaches the engine late, and a request that arrives while other streams are busy waits for their
chunks. :class:`FrontEnd` keeps that work on whatever clock its caller uses (the emulator's engine
time, the simulator's virtual time): ``frontend_request_s`` of work per request taken in,
``frontend_handoff_s`` per hand-off to the engine, ``frontend_token_s`` per stream chunk sent
(:class:`~inferplane.physics.hardware.HardwareProfile`).

The server is *processor sharing* (session 16), not first come first served (sessions 8-15): the
work in hand at a moment progresses together, each piece at ``1/n`` of the server's speed while
``n`` pieces are in hand. vLLM's API server is an asyncio event loop whose handlers run in short
slices between their awaits, beside the tokeniser's threads and, on the fidelity machine, the
client on the same core: what it has in hand advances together rather than one request after
the other. So a piece of work that arrives later delays one already under way by as much of its
own length as the earlier one still has left (``min`` of the two): on the fidelity vLLM a long
prompt sent one decode step before three others came 8.6 ms later than alone (35.3 against
26.7 ms, medians of 12 rounds: docs/benchmarks.md, session 15), which a first-come-first-served
server, where nothing that arrives later can overtake work already queued, delays only by the
pieces that reached it first.

A request's intake is two pieces, ``frontend_request_s`` when it arrives and
``frontend_handoff_s`` after the request's parallel wait (``request_overhead_s``: the hops
between processes); the callers (the emulator, the simulator,
``physics.calibration.predict_burst_s``) start the second piece when the wait is over. A burst of
``N`` sent at once shares the server: its first pieces end together after ``N ×
frontend_request_s``, its second pieces together ``N × frontend_handoff_s`` after the wait.

Chunks coalesce as vLLM's do: tokens a step produces while an earlier step's chunks are still
being sent wait for them, joining whatever waits already (vLLM merges a request's pending
outputs into one), and are sent when those are done, so a front end that falls behind sends
fewer, larger chunks instead of an ever longer queue — the "whole stream in one burst" of a
starved engine.

It never reads a clock and never sleeps. Each piece of work is a :class:`Job`; :meth:`FrontEnd.
end_of` is when it ends if nothing more arrives (work that arrives later can only delay it), and
``Job.end`` is set once :meth:`FrontEnd.advance` has run the server past it. Calls come in time
order; a call with a time before the server's own (``now``) counts from ``now``.
"""

from __future__ import annotations

import heapq
import math
from collections import deque

#: Seconds of rounding within which a piece of work counts as done at the time it was due.
_EPS = 1e-12


class Job:
    """One piece of the front end's work; ``end`` is when it was done (None while in hand)."""

    __slots__ = ("end", "tag")

    def __init__(self, tag: float, end: float | None = None) -> None:
        self.tag = tag  # the server's attained service at which it is done
        self.end = end


class FrontEnd:
    """A processor-sharing single server: ``n`` pieces in hand each progress at ``1/n``.

    Kept with the classic virtual-time bookkeeping: ``_v`` is the service each piece in hand has
    received since the server started (it grows at ``1/n`` per second), and a piece of ``w``
    seconds that arrives at ``_v = v`` is done when ``_v`` reaches ``v + w`` (its ``tag``).

    A caller that knows when future tokens will be produced (the simulator, which computes a run
    of steps at once) may :meth:`announce` them ahead: they are sent from their own times.
    """

    __slots__ = (
        "_emitting", "_heap", "_later", "_queued", "_queued_streams", "_seq", "_v", "handoff_s",
        "now", "request_s", "token_s",
    )

    def __init__(
        self, request_s: float = 0.0, token_s: float = 0.0, handoff_s: float = 0.0
    ) -> None:
        if request_s < 0 or token_s < 0 or handoff_s < 0:
            raise ValueError("front-end service times must be >= 0")
        self.request_s = request_s
        self.token_s = token_s
        self.handoff_s = handoff_s
        self.now = 0.0  # the time up to which the server has run
        self._v = 0.0
        self._seq = 0
        self._heap: list[tuple[float, int, Job]] = []  # the pieces in hand, by tag
        self._emitting: Job | None = None  # the chunks being sent
        self._queued: Job | None = None  # the chunks that wait for them (not in hand yet)
        self._queued_streams = 0
        self._later: deque[tuple[float, int]] = deque()  # announced (time, streams)

    @property
    def enabled(self) -> bool:
        return self.request_s > 0 or self.token_s > 0 or self.handoff_s > 0

    def reset(self) -> None:
        """Idle, nothing in hand (a restarted engine)."""
        self.now = self._v = 0.0
        self._heap.clear()
        self._emitting = self._queued = None
        self._queued_streams = 0
        self._later.clear()

    # -- the server ------------------------------------------------------------------------
    def advance(self, t: float) -> None:
        """Run the server until ``t``: the pieces due by then get their ``end``, the chunks
        announced until then start at their own times."""
        if t < self.now:
            t = self.now
        later = self._later
        while True:
            until = t
            if later and later[0][0] <= t:
                until = later[0][0]
            self._run(until)
            if later and later[0][0] <= t:
                self._emit(later.popleft()[1])
                continue
            return

    def _run(self, t: float) -> None:
        heap = self._heap
        while heap:
            tag = heap[0][0]
            end = self.now + (tag - self._v) * len(heap)
            if end > t + _EPS:
                self._v += (t - self.now) / len(heap)
                break
            done = heapq.heappop(heap)[2]
            done.end = end if end > self.now else self.now
            if end > self.now:
                self.now = end
            self._v = tag
            if done is self._emitting:
                self._emitting = None
                queued = self._queued
                if queued is not None:  # the chunks that waited for these: sent from now
                    self._queued = None
                    queued.tag = tag + self._queued_streams * self.token_s
                    self._push_job(queued)
                    self._emitting = queued
        if t > self.now:
            self.now = t

    def start(self, t: float, seconds: float) -> Job:
        """A piece of ``seconds`` of work arrives at ``t`` (not before ``now``: then at ``now``).
        A piece of no work is done at once."""
        self.advance(t)
        return self._push(seconds)

    def _push(self, seconds: float) -> Job:
        if seconds <= 0:
            return Job(self._v, self.now)
        job = Job(self._v + seconds)
        self._push_job(job)
        return job

    def _push_job(self, job: Job) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (job.tag, self._seq, job))

    def end_of(self, job: Job) -> float:
        """When ``job`` is done: its ``end`` once done, else when it will be if no more work
        arrives (later work can only delay it: a lower bound)."""
        if job.end is not None:
            return job.end
        if job is self._queued:  # sent after the chunks ahead of it, at best alone
            assert self._emitting is not None
            return self.end_of(self._emitting) + self._queued_streams * self.token_s
        t, v, n = self.now, self._v, len(self._heap)
        for tag in sorted(e[0] for e in self._heap if e[0] <= job.tag):
            t += (tag - v) * n
            v = tag
            n -= 1
        return t

    def next_end(self) -> float:
        """When the first piece in hand will be done if no more work arrives (inf: none)."""
        heap = self._heap
        if not heap:
            return math.inf
        return self.now + (heap[0][0] - self._v) * len(heap)

    def backlog_s(self, now: float) -> float:
        """Work in hand at ``now`` (the server's time, if later)."""
        self.advance(now)
        return sum(e[0] - self._v for e in self._heap)

    # -- the intake ------------------------------------------------------------------------
    def intake(self, t: float) -> Job:
        """A request arrives at ``t``: the first piece of its intake (``request_s``)."""
        return self.start(t, self.request_s)

    def handoff(self, t: float) -> Job:
        """A request whose first piece is done and whose parallel wait is over at ``t``: the
        second piece (``handoff_s``), after which it reaches the engine."""
        return self.start(t, self.handoff_s)

    # -- the stream ------------------------------------------------------------------------
    def emit(self, t: float, streams: int) -> Job:
        """The engine produced tokens for ``streams`` requests at ``t``: the work of sending
        them, or the chunks still being sent that they join."""
        self.advance(t)
        return self._emit(streams)

    def _emit(self, streams: int) -> Job:
        if self.token_s <= 0 or streams <= 0:
            return Job(self._v, self.now)
        if self._emitting is None:
            job = self._emitting = self._push(streams * self.token_s)
            return job
        # chunks are being sent: these wait for them, joining those that wait already (a
        # request's pending outputs merge into one chunk)
        if self._queued is None:
            self._queued = Job(math.inf)
            self._queued_streams = 0
        if streams > self._queued_streams:
            self._queued_streams = streams
        return self._queued

    def announce(self, at: float, streams: int) -> None:
        """Tokens for ``streams`` requests will be produced at ``at`` (not before any earlier
        call's time): they are sent from then on, as :meth:`emit` sends them."""
        if self.token_s > 0 and streams > 0:
            self._later.append((at, streams))
