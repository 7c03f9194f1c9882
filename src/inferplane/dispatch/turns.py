"""`TurnGate`: a placed request waits one turn of the event loop, behind the rest of its burst,
and the burst goes out with each engine's shared-prefix leaders and short prompts first.

A burst's requests reach the gateway together: their handlers are queued on the loop in one turn
and each runs its pre-send path (classify, admit, place, reserve) in turn, about a millisecond
each. Sent as soon as it is placed, the first request reaches its engine alone: an idle vLLM
engine core starts a step with it at once, and the burst's other requests for that engine,
arriving a millisecond or two apart while the gateway places them, wait for that step to end
before any of them is scheduled (docs/benchmarks.md, session 26). With
``gateway.send_bursts_together`` every placed request for a self-hosted engine that batches
(`Endpoint.joins_steps`) yields once before it is sent: it resumes in the next turn, behind every
handler queued in this one, so the requests whose handlers ran in one turn (a group) are all
placed first and then sent back to back, and an engine takes its share of them into one step.

The group goes out in this order (`release_order`): a request that reuses the head of an earlier
request's prompt to the same engine beyond what that one had cached when placed (placement
counted those blocks as uncached for the first and as cached behind it for the later one: the
first computes them) goes after it, keyed no lower; otherwise the least uncached prompt tokens
first, within priority bands (a family goes at its most urgent member's band), ties in the order
placed. An engine schedules first come, first served, filling a step's token budget front to
back: short prompts get their first token in the first step instead of behind a long prefill
placed before them, and a request never goes ahead of the prefix it reuses. A head that every
prompt shares and the engine holds already (a system prompt) ties nobody.

A request resumes in the next turn and goes at once when every request ordered before it has
gone (a lone request, or a group already in order, costs one turn of the loop, as before
ordering); one that resumes before its turn waits until those before it have gone or been woken,
and is woken behind them (one turn more, or a few in a group resumed far out of order). A
request cancelled at the gate counts as gone.

What counts as a burst is what the loop sees: requests read from their sockets in one poll whose
pre-send path does not wait (no Redis admission store, shared slots, session lookup in Redis or
admission-queue wait before the send). Requests on new connections, read in successive polls,
and those that wait in admission go out in smaller groups.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence

from inferplane.admission.queue import BANDS


class Held:
    """One request at the gate: its engine, the uncached prompt tokens placement expects there
    (``cost``), its prompt's tokens and block hash chain (``hashes``: each hash names the whole
    prefix up to its block), its priority band and its place in arrival order."""

    __slots__ = ("band", "cost", "endpoint", "future", "gone", "hashes", "seq", "tokens")

    def __init__(self, endpoint: str, cost: float, tokens: int,
                 hashes: Sequence[Hashable], band: int, seq: int) -> None:
        self.endpoint, self.cost, self.tokens, self.hashes, self.band, self.seq = (
            endpoint, cost, tokens, hashes, band, seq)
        self.future: asyncio.Future[None] | None = None  # set while it waits for its turn
        self.gone = False


def release_order(held: Sequence[Held]) -> list[Held]:
    """``held`` (in arrival order) in the order they are sent.

    A request **reuses** an earlier one of the group when both go to one endpoint and share
    more of their prompts' heads than the earlier one had cached when placed (the blocks it
    computes, placement having counted them cached for the later one): it must go after it. Its
    key is the larger of its own uncached tokens and that request's key, and it takes its band
    from the family's first request (the most urgent of the family's). The group goes by (band,
    key, arrival). A head that every prompt shares and the engine holds already (a common
    system prompt) makes nobody wait."""
    first: dict[tuple[str, Hashable], Held] = {}  # (endpoint, block hash) -> first to carry it
    key: dict[int, float] = {}
    root: dict[int, int] = {}  # seq -> the seq of the family's first request
    band: dict[int, int] = {}  # a family's first request's seq -> the family's band
    for h in held:
        k, r, hs, ep = h.cost, h.seq, h.hashes, h.endpoint
        lo, hi = 0, len(hs)  # the blocks h shares with an earlier request: a chain's prefix
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if (ep, hs[mid - 1]) in first:
                lo = mid
            else:
                hi = mid - 1
        if lo:
            lead = first[(ep, hs[lo - 1])]
            per_block = lead.tokens / len(lead.hashes)
            if lo * per_block > lead.tokens - lead.cost + per_block / 2:
                k = max(k, key[lead.seq])
                r = root[lead.seq]
        key[h.seq], root[h.seq] = k, r
        band[r] = min(band.get(r, h.band), h.band)
        for x in hs:
            first.setdefault((ep, x), h)
    return sorted(held, key=lambda h: (band[root[h.seq]], key[h.seq], h.seq))


class _Group:
    __slots__ = ("held", "next", "order")

    def __init__(self) -> None:
        self.held: list[Held] = []
        self.order: list[Held] | None = None  # set when the group closes
        self.next = 0  # the index in `order` of the first request not gone

    def close(self) -> None:
        self.order = release_order(self.held)

    def due(self, h: Held) -> bool:
        """Whether every request ordered before ``h`` has gone."""
        order = self.order
        if order is None:  # the loop stopped before the group closed
            return True
        while self.next < len(order) and order[self.next].gone:
            self.next += 1
        return self.next < len(order) and order[self.next] is h

    def gone(self, h: Held) -> None:
        h.gone = True
        order = self.order
        if order is None:
            return
        while self.next < len(order) and order[self.next].gone:
            self.next += 1
        # wake the waiting requests ordered next, up to one that has not resumed yet (it goes
        # on its own once these have gone): their wake-ups are queued in this order, and
        # none of them checks again
        for w in order[self.next:]:
            if w.gone:  # cancelled at the gate
                continue
            fut = w.future
            if fut is None:
                break
            if not fut.done():
                fut.set_result(None)


class TurnGate:
    """`wait` returns in the next turn of the loop once every caller of its turn ordered before
    it (`release_order`) has returned; a caller that resumes before its turn waits for its
    predecessor (one more turn).

    ``groups`` and ``held`` count the turns that had callers and the callers (re-placed attempts
    and callers cancelled while they wait included): ``held / groups`` is the mean group sent
    together; ``reordered`` counts the callers that waited for a predecessor."""

    __slots__ = ("_group", "_open", "_seq", "groups", "held", "reordered")

    def __init__(self) -> None:
        # the loop on which a group is being gathered in this turn (None: no group open); a
        # loop that stopped before closing its group leaves it behind, and the next loop's
        # first caller starts a new one
        self._open: asyncio.AbstractEventLoop | None = None
        self._group = _Group()
        self._seq = 0
        self.groups = 0
        self.held = 0
        self.reordered = 0

    async def wait(
        self,
        endpoint: str = "",
        cost: float = 0.0,
        tokens: int = 0,
        hashes: Sequence[Hashable] = (),
        priority: str = "standard",
    ) -> None:
        self.held += 1
        loop = asyncio.get_running_loop()
        if self._open is not loop:
            self._open = loop
            self._group = _Group()
            self.groups += 1
            # runs after this turn's callbacks, before any caller of it resumes
            loop.call_soon(self._close, self._group)
        group = self._group
        self._seq += 1
        band = BANDS.index(priority) if priority in BANDS else 1
        h = Held(endpoint, cost, tokens, hashes, band, self._seq)
        group.held.append(h)
        try:
            await asyncio.sleep(0)  # resumes next turn, behind the handlers queued in this one
            if not group.due(h):
                self.reordered += 1
                h.future = loop.create_future()
                await h.future
        finally:
            group.gone(h)

    def _close(self, group: _Group) -> None:
        if group is self._group:
            self._open = None
        group.close()
