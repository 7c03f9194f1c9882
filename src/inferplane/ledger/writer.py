"""What every ledger writer shares: the pending buffer with its commit futures, chaining a
batch onto a shard's head (with the checkpoints it crosses), and accounting a committed batch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from inferplane.ledger.chain import Checkpoint, Signer, chain_hash
from inferplane.ledger.record import Entry, Receipt, encode_entry, resolve
from inferplane.ledger.record import Outcome as Outcome
from inferplane.placement.framework import Decision

log = logging.getLogger("inferplane.ledger")


@dataclass(slots=True)
class Pending:
    entry: Entry
    future: asyncio.Future[bool] | None
    loop: asyncio.AbstractEventLoop | None


@dataclass(frozen=True, slots=True)
class Linked:
    """A record placed in its shard's chain, ready to insert."""

    entry: Entry
    shard: str
    seq: int
    prev_hash: str
    chain_hash: str


def link(
    entries: Sequence[Entry],
    shard: str,
    head: tuple[int, str],
    signer: Signer | None,
    checkpoint_every: int,
    sign_last: bool,
    now: float,
) -> tuple[list[Linked], list[Checkpoint], tuple[int, str]]:
    """Chain ``entries`` after ``head`` (seq, chain hash); sign a checkpoint at every multiple of
    ``checkpoint_every`` and, with ``sign_last``, at the batch's last record."""
    seq, prev = head
    out: list[Linked] = []
    cps: list[Checkpoint] = []
    for e in entries:
        seq += 1
        h = chain_hash(shard, seq, prev, e.receipt)
        out.append(Linked(e, shard, seq, prev, h))
        prev = h
        if signer is not None and seq % checkpoint_every == 0:
            cps.append(signer.sign(shard, seq, h, now))
    if signer is not None and sign_last and seq > 0 and (not cps or cps[-1].seq != seq):
        cps.append(signer.sign(shard, seq, prev, now))
    return out, cps, (seq, prev)


class PendingBuffer:
    """Encoded records waiting for the writer. ``add`` runs on the request path: O(1) under a
    lock never held across I/O. Settling a batch's futures is thread-safe."""

    def __init__(self, max_pending: int, name: str) -> None:
        self.max_pending = max_pending
        self.name = name
        self.items: deque[Pending] = deque()
        self.lock = threading.Lock()
        self.dropped = 0

    def record(self, decision: Decision, outcome: Outcome, at_unix: float) -> tuple[Receipt, int]:
        """Encode and queue one record; return its receipt and the number now pending."""
        try:
            entry = encode_entry(decision, outcome, at_unix)
        except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError
            with self.lock:
                self.dropped += 1
            log.error("ledger %s: dropped decision %s: %s", self.name, decision.decision_id, exc)
            r = Receipt("")
            r.committed = False
            return r, len(self.items)
        loop: asyncio.AbstractEventLoop | None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        fut: asyncio.Future[bool] | None = loop.create_future() if loop is not None else None
        p = Pending(entry, fut, loop)
        with self.lock:
            if len(self.items) >= self.max_pending:
                old = self.items.popleft()
                self.dropped += 1
                settle([old], False)
            self.items.append(p)
            n = len(self.items)
        r = Receipt(entry.receipt, fut)
        if fut is None:
            r.committed = None
        return r, n

    def take(self, n: int) -> list[Pending]:
        with self.lock:
            k = min(n, len(self.items))
            return [self.items.popleft() for _ in range(k)]

    def requeue(self, batch: list[Pending]) -> None:
        with self.lock:
            self.items.extendleft(reversed(batch))
            over = max(0, len(self.items) - self.max_pending)
            lost = [self.items.popleft() for _ in range(over)]
            self.dropped += over
        settle(lost, False)

    def clear(self) -> int:
        with self.lock:
            lost = list(self.items)
            self.items.clear()
            self.dropped += len(lost)
        settle(lost, False)
        return len(lost)

    def __len__(self) -> int:
        return len(self.items)


def settle(batch: Sequence[Pending], ok: bool) -> None:
    """Settle the futures of ``batch`` from any thread (one hop per event loop)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[bool]]] = {}
    for p in batch:
        if p.future is not None and p.loop is not None:
            by_loop.setdefault(p.loop, []).append(p.future)
    for loop, futs in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            if _on_loop(loop):
                resolve(futs, ok)
            else:
                loop.call_soon_threadsafe(resolve, futs, ok)


class CommitAccounting:
    """The counters and signing state of a durable ledger (SQLite, PostgreSQL), kept the same
    way by both after each committed batch, and whether its store is down: from a failed write
    until the next commit (`store_down`; answers then do not wait for their record's commit)."""

    batches_written: int
    records_written: int
    checkpoints_written: int
    batch_size: int
    _buf: PendingBuffer
    _unsigned: bool
    _last_checkpoint: float
    _down_since: float | None = None
    """monotonic time of the first failed write since the last commit (None: not down)."""
    _resumed: tuple[float, float, int] | None = None
    """After an outage: (its start, when writes resumed, records_written at its start), until
    the backlog is written and the resumption logged."""
    _down_written = 0
    log_name = "ledger"

    @property
    def store_down(self) -> bool:
        """The last write failed and none has committed since: the store is known down."""
        return self._down_since is not None

    @property
    def writes_failing(self) -> bool:
        """The store is down (the last write failed, none committed since), spool or not:
        ``inferplane_ledger_store_down``."""
        return self._down_since is not None

    @property
    def spooled(self) -> int:
        """Records in a spool: none (PostgreSQL's ledger has one)."""
        return 0

    def _note_failure(self) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            if self._resumed is None:
                self._down_written = self.records_written
            self._resumed = None

    def _note_resumed(self, batch_len: int) -> None:
        now = time.monotonic()
        if self._down_since is not None:
            self._resumed = (self._down_since, now, self._down_written)
            self._down_since = None
        if self._resumed is not None and not self.spooled and (
                batch_len < self.batch_size or not len(self._buf)):
            start, up, written = self._resumed
            self._resumed = None
            log.warning("%s: writes resumed after %.1f s down; %d records written since the "
                        "outage began", self.log_name, up - start,
                        self.records_written - written)

    def _committed(self, batch: Sequence[Pending], cps: Sequence[Checkpoint],
                   head_seq: int, written: int | None = None) -> None:
        """``batch`` (and ``cps``) are committed with the shard's head at ``head_seq``: settle
        the waiters, count them, and note whether the head is covered by a checkpoint.
        ``written``: how many of ``batch`` the commit added (a spool's replay skips records a
        crashed replay had already written); default all."""
        settle(batch, True)
        n = len(batch) if written is None else written
        if n:
            self.batches_written += 1
            self.records_written += n
        if self._down_since is not None or self._resumed is not None:
            self._note_resumed(len(batch))
        self.checkpoints_written += len(cps)
        if cps and cps[-1].seq == head_seq:
            self._unsigned = False
            self._last_checkpoint = time.monotonic()
        elif n:
            self._unsigned = True


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
