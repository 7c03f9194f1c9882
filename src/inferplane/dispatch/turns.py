"""`TurnGate`: a placed request waits one turn of the event loop, behind the rest of its burst.

A burst's requests reach the gateway together: their handlers are queued on the loop in one turn
and each runs its pre-send path (classify, admit, place, reserve) in turn. Sent at once, the
first request starts its prefill on an engine while the gateway is still placing the others;
where the engines share the gateway's cores (a node that runs both, the real-engine bench's
two-core host), that prefill takes the CPU the rest of the burst's placement needs, and the last
request of the burst goes out late; and an idle vLLM engine core starts a step with the first
request it gets, so the burst's other requests for it, placed a millisecond or two later, wait
for that step to end (docs/benchmarks.md, session 26). With ``gateway.send_bursts_together``
every request the HTTP gateway placed on a self-hosted engine (`Endpoint.joins_steps`: not a
provider API; whatever its priority; not the batch lane or the simulator: `Core.open_with`)
yields once before it is sent: it resumes in the next turn, behind every handler queued in this
one, so the requests whose handlers ran in one turn are all placed first and then sent, back to
back, in the order placed, and a request that reuses a prefix another of the burst computes
lands in the same engine step as that one. A lone request resumes one turn
later (microseconds on an idle gateway). Sending a burst shortest uncached prompt first (each
prefix leader before its followers) was measured and not kept: it moved time from the short
requests to the long ones and raised the P90 (docs/benchmarks.md, session 27).

What counts as a burst is what the loop sees: requests read from their sockets in one poll whose
pre-send path does not wait (no Redis admission store, shared slots, session lookup in Redis or
admission-queue wait before the send). Requests on new connections, read in successive polls,
and those that wait in admission go out in smaller groups.
"""

from __future__ import annotations

import asyncio


class TurnGate:
    """`wait` returns in the next turn of the loop; the callers of one turn resume in the order
    they came, after every callback that was queued before them.

    ``groups`` and ``held`` count the turns that had callers and the callers (re-placed attempts
    and callers cancelled while they wait included): ``held / groups`` is the mean group sent
    together."""

    __slots__ = ("_open", "groups", "held")

    def __init__(self) -> None:
        # the loop on which a group is being gathered in this turn (None: no group open); a
        # loop that stopped before closing its group leaves it behind, and the next loop's
        # first caller starts a new one
        self._open: asyncio.AbstractEventLoop | None = None
        self.groups = 0
        self.held = 0

    async def wait(self) -> None:
        self.held += 1
        loop = asyncio.get_running_loop()
        if self._open is not loop:
            self._open = loop
            self.groups += 1
            # runs after this turn's callbacks (no caller waits on it: nothing to strand)
            loop.call_soon(self._close)
        await asyncio.sleep(0)  # resumes next turn, behind the handlers queued in this one

    def _close(self) -> None:
        self._open = None
