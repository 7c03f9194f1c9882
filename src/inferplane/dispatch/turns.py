"""`TurnGate`: hold requests until the event loop's current turn has run everything queued.

A burst's requests reach the gateway together: their handlers are queued on the loop in one turn
and each runs its pre-send path (classify, admit, place, reserve) in turn. Sent at once, the
first request starts its prefill on an engine while the gateway is still placing the others;
where the engines share the gateway's cores (a node that runs both, the real-engine bench's
two-core host), that prefill takes the CPU the rest of the burst's placement needs, and the
last request of the burst goes out late. With ``gateway.send_bursts_together`` every request
waits at the gate after it is placed: the gate opens once the loop has run the callbacks that
were queued when the first one arrived (the rest of the burst), so the whole burst is placed
first and then sent, back to back. A lone request waits one turn of the loop (microseconds on an
idle gateway).
"""

from __future__ import annotations

import asyncio


class TurnGate:
    """Callers of `wait` in one turn of the loop are released together, at the next turn.

    One gate per event loop user (a gateway); a cancelled waiter leaves the others waiting for
    the same opening. ``opened`` and ``held`` count openings and the requests they released
    (``held / opened`` is the mean burst the gate gathered)."""

    __slots__ = ("_waiters", "held", "opened")

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []
        self.opened = 0
        self.held = 0

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if not self._waiters:
            # call_soon appends behind every callback already queued for this turn: the other
            # handlers of the burst run (and reach this gate) before it opens
            loop.call_soon(self._open)
        self._waiters.append(fut)
        await fut

    def _open(self) -> None:
        waiters, self._waiters = self._waiters, []
        self.opened += 1
        self.held += len(waiters)
        for fut in waiters:
            if not fut.done():  # a cancelled waiter
                fut.set_result(None)
