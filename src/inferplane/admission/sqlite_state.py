"""`SqliteStore`: the embedded admission store that survives a restart or a kill -9.

Budget counters (spend and live leases) and usage totals are rows of one SQLite file (WAL,
``synchronous=NORMAL``: a committed transaction survives the process being killed; only an
operating-system crash may lose the last ones). Each operation is one transaction on one
dedicated thread, so it never blocks the event loop and is atomic; ``BEGIN IMMEDIATE`` and a
busy timeout make it safe when another process opens the same file (a restarted gateway while
the old one drains).

What stays in memory (`MemoryStore`), because it is short-lived and losing it on a restart
grants nothing a budget forbids: token buckets (rate limits refill within their window), retry
markers and agent-loop counters.

Amounts are stored as integer nano-USD, so sums are exact (as in `RedisStore`).

When the file cannot be written (a full disk, a file or directory made read-only, an I/O error,
a lock held past the busy timeout), the store degrades as the Redis store does in an outage
(`admission.outage`), and as the SQLite ledger keeps its records (`ledger.sqlite`):

- a settle or usage update that fails is **kept pending** in memory and written by a
  background retry every ``retry_after_s`` (``admission.outage_retry_after_s``) and before
  any later operation; updates that arrive meanwhile wait behind it, so none is lost while the
  process runs (a process killed before the file is writable again loses them: they are in
  memory only, as the ledger's pending records are). Usage updates are merged per tenant and
  group (they add up), so they take room per group in use, not per request; settles are kept
  one by one, at most ``MAX_PENDING_SETTLES`` (more are dropped and counted, their leases
  holding the budget's worst case until they expire). The write is one task of the store's,
  which a cancelled caller does not stop, so each update is written exactly once;
- an update that cannot apply (an ``IntegrityError``: writing it again cannot cure it) is
  dropped and logged, the others are written; a damaged file (``DatabaseError``) is an outage
  like a full disk;
- a budget check (`reserve`) and the usage / counter reads first write what is pending; when
  that fails they are refused with 503 ``store_unavailable`` and Retry-After (a budget that
  cannot be checked admits nothing; tenants without budgets are unaffected);
- one ERROR when the file stops taking writes and one WARNING when it takes them again
  (with how many pending updates were written), never one line per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from inferplane.admission.state import (
    SEP,
    CounterDemand,
    CounterState,
    MemoryStore,
    StoreHealth,
    UsageRow,
)
from inferplane.errors import StoreUnavailableError
from inferplane.sqliteio import immediate, open_wal

T = TypeVar("T")
NANO = 1_000_000_000
log = logging.getLogger("inferplane.admission")

#: what one update can fail with that writing it again cannot cure (a constraint, a bad
#: value): that update is dropped and logged, the others are written
_BAD_UPDATE = (
    sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.DataError,
    sqlite3.NotSupportedError, sqlite3.InterfaceError,
)
#: what a write to the file can fail with that writing it later may cure (a full disk, a lock,
#: an I/O error; a damaged file too: an outage until someone repairs it)
_WRITE_FAILURES = (sqlite3.DatabaseError, OSError)
#: settles kept pending at most (usage updates are merged per tenant and group); more are
#: dropped and counted (``dropped``), as the ledger drops beyond its ``max_pending``
MAX_PENDING_SETTLES = 100_000
Op = Callable[[sqlite3.Connection], None]
_USAGE_UPSERT = (
    "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, grp) DO UPDATE "
    "SET nusd = nusd + excluded.nusd, prompt = prompt + excluded.prompt, "
    "completion = completion + excluded.completion, requests = requests + excluded.requests"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    key          TEXT PRIMARY KEY,
    expires_at   REAL NOT NULL,
    spent_nusd   INTEGER NOT NULL DEFAULT 0,
    spent_tokens INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS leases (
    counter    TEXT NOT NULL,
    lease      TEXT NOT NULL,
    nusd       INTEGER NOT NULL,
    tokens     INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (counter, lease)
);
CREATE TABLE IF NOT EXISTS usage (
    tenant     TEXT NOT NULL,
    grp        TEXT NOT NULL,
    nusd       INTEGER NOT NULL DEFAULT 0,
    prompt     INTEGER NOT NULL DEFAULT 0,
    completion INTEGER NOT NULL DEFAULT 0,
    requests   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, grp)
);
"""


def _nano(usd: float) -> int:
    return round(usd * NANO)


class SqliteStore(MemoryStore):
    """`AdmissionStore` whose budgets and usage live in a SQLite file."""

    def __init__(
        self,
        path: str | Path,
        *,
        retry_after_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        max_workflows: int | None = None,
    ) -> None:
        super().__init__(max_workflows=max_workflows)
        self.path = str(path)
        self.retry_after_s = retry_after_s
        self.clock = clock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inferplane-adm-db")
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self.pending: deque[Op] = deque()  # settles not yet written, in order
        # usage updates not yet written, merged per (tenant, group): [nUSD, prompt,
        # completion, requests]
        self.pending_usage: dict[tuple[str, str], list[int]] = {}
        self.max_pending_settles = MAX_PENDING_SETTLES
        self.dropped = 0  # settles dropped beyond max_pending_settles, or that could not apply
        self.down_since: float | None = None  # when the file stopped taking writes
        self.outages = 0
        self.written_late = 0  # pending updates written once the file took writes again
        self._retrier: asyncio.Task[None] | None = None
        self._flush_task: asyncio.Task[bool] | None = None  # the one flush running, if any

    # -- plumbing -------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        return open_wal(self.path, _SCHEMA)

    async def _tx(self, fn: Callable[[sqlite3.Connection], T], write: bool = True) -> T:
        """Run ``fn`` in one transaction on the store's thread: an immediate one (the write
        lock taken at once) with ``write``, else a read."""

        def call() -> T:
            if self._conn is None:
                self._conn = self._open()
            with immediate(self._conn, write):
                return fn(self._conn)

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    # -- when the file cannot be written -------------------------------------------------
    @property
    def backlog(self) -> int:
        """Pending settles plus pending (merged) usage rows."""
        return len(self.pending) + len(self.pending_usage)

    def health(self) -> StoreHealth:
        """For ``/metrics``: whether the file takes writes, and what waits for it."""
        down = self.down_since
        return StoreHealth(
            up=down is None, down_for_s=0.0 if down is None else max(0.0, self.clock() - down),
            pending_settles=len(self.pending), pending_usage=len(self.pending_usage),
        )

    async def _now(self, op: Op) -> bool:
        """Write ``op`` now when nothing waits; True when it is done with (written, or dropped
        as an update that cannot apply), False when it must be kept pending."""
        if self.backlog:
            return False  # earlier updates wait: this one goes after them
        try:
            await self._tx(op)
        except _BAD_UPDATE as exc:
            self._bad(exc)
        except _WRITE_FAILURES as exc:
            self._failed(exc)
            return False
        return True

    async def _write(self, op: Op) -> None:
        """Write ``op`` (a settle) now, or keep it pending when the file cannot take it (or
        earlier updates still wait). Beyond ``max_pending_settles`` it is dropped and
        counted: its lease then holds its budget's worst case until the lease expires."""
        if await self._now(op):
            return
        if len(self.pending) >= self.max_pending_settles:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.error(
                    "admission store %s: %d settles pending (the most kept); %d dropped so "
                    "far (their leases hold their budgets' worst case until they expire)",
                    self.path, len(self.pending), self.dropped,
                )
        else:
            self.pending.append(op)
        self._ensure_retrier()

    def _bad(self, exc: BaseException) -> None:
        self.dropped += 1
        log.error(
            "admission store %s: an update could not be applied and is dropped (%s: %s)",
            self.path, type(exc).__name__, exc,
        )

    async def _flush(self) -> bool:
        """Write what is pending, in one transaction; True when nothing is left. A failure
        keeps it all pending (the transaction is rolled back).

        The write is one task owned by the store, which its callers await through
        ``asyncio.shield``: a caller cancelled mid-flush (a client that disconnects, ``close``)
        does not stop the commit on the store's thread, and the updates leave ``pending``
        exactly when they are committed, so each is applied once. A caller that comes while a
        flush runs waits for it, then flushes what arrived meanwhile."""
        while self.backlog:
            task = self._flush_task
            if task is None or task.done():
                task = self._flush_task = asyncio.get_running_loop().create_task(
                    self._flush_once()
                )
            if not await asyncio.shield(task):
                return False
        return True

    async def _flush_once(self) -> bool:
        ops = list(self.pending)
        settles = len(ops)
        # a copy: the rows stay pending (and counted) until their commit, then this much of
        # each leaves (what was added meanwhile stays)
        usage = {key: tuple(vals) for key, vals in self.pending_usage.items()}

        def apply_usage(c: sqlite3.Connection) -> None:
            for (tenant, grp), (n, p, cc, r) in usage.items():
                c.execute(_USAGE_UPSERT, (tenant, grp, n, p, cc, r))

        def apply(c: sqlite3.Connection) -> None:
            for op in ops:
                op(c)
            apply_usage(c)

        try:
            try:
                await self._tx(apply)
            except _BAD_UPDATE:
                # one of them cannot apply: each alone, dropping that one, the rest written
                for op in ops:
                    try:
                        await self._tx(op)
                    except _BAD_UPDATE as exc:
                        self._bad(exc)
                    self.pending.popleft()
                ops = []
                await self._tx(apply_usage)
        except _WRITE_FAILURES as exc:
            self._failed(exc)
            return False
        for _ in ops:  # committed: these, and only these, leave pending (later ones stay)
            self.pending.popleft()
        for key, vals in usage.items():
            row = self.pending_usage[key]
            for i, v in enumerate(vals):
                row[i] -= v
            if not row[3]:  # no request added meanwhile
                del self.pending_usage[key]
        written = settles + len(usage)
        self.written_late += written
        self._back(written)
        return True

    def _back(self, written: int) -> None:
        if self.down_since is not None:
            log.warning(
                "admission store %s writable again after %.1f s; %d pending settles and usage "
                "rows written", self.path, self.clock() - self.down_since, written,
            )
            self.down_since = None

    async def _ready(self, what: str) -> None:
        """Before a budget check or a read: write what is pending, or refuse with 503."""
        if self.backlog and not await self._flush():
            raise self._unavailable(what)

    def _failed(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = self.clock()
            self.outages += 1
            log.error(
                "admission store %s cannot be written (%s: %s): budgets fail closed with 503, "
                "settles and usage are kept in memory and retried every %g s",
                self.path, type(exc).__name__, exc, self.retry_after_s,
            )

    def _unavailable(self, what: str) -> StoreUnavailableError:
        return StoreUnavailableError.retry_after(
            f"the admission store ({self.path}) cannot be written", what, self.retry_after_s
        )

    def _ensure_retrier(self) -> None:
        if not self._closed and (self._retrier is None or self._retrier.done()):
            self._retrier = asyncio.get_running_loop().create_task(self._retry())

    async def _retry(self) -> None:
        """Every ``retry_after_s``, try to write what is pending, until nothing is."""
        while self.backlog:
            await asyncio.sleep(self.retry_after_s)
            try:
                await self._flush()
            except Exception as exc:  # a bug, not an outage: said, and tried again
                log.error("admission store %s: writing the pending updates failed (%s: %s)",
                          self.path, type(exc).__name__, exc)

    async def ping(self) -> bool:
        """Open the file (and create its tables) now, so an unwritable path fails at start."""
        await self._tx(lambda c: None)
        return True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._retrier is not None:
            # cancelling the retrier stops its sleep or its wait; a flush it started runs on
            # (shielded) and is awaited here, so its updates are neither lost nor written twice
            self._retrier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrier
        if self.backlog and not await self._flush():  # one last try (after a running one)
            lost = self.backlog
            self.pending.clear()
            self.pending_usage.clear()
            log.error(
                "closing with %d admission settles and usage updates not written to %s (it "
                "still cannot be written): they are lost", lost, self.path,
            )

        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._pool, shut)
        self._pool.shutdown(wait=True)

    # -- counters -------------------------------------------------------------------------
    @staticmethod
    def _live(c: sqlite3.Connection, d: CounterDemand, now: float) -> tuple[int, int, int, int]:
        """(spent nUSD, spent tokens, reserved nUSD, reserved tokens) of a counter at ``now``,
        after dropping its expired leases (and the whole counter when its window is over)."""
        row = c.execute(
            "SELECT expires_at, spent_nusd, spent_tokens FROM counters WHERE key = ?", (d.key,)
        ).fetchone()
        if row is not None and row[0] <= now:
            c.execute("DELETE FROM counters WHERE key = ?", (d.key,))
            c.execute("DELETE FROM leases WHERE counter = ?", (d.key,))
            row = None
        if row is None:
            c.execute(
                "INSERT INTO counters (key, expires_at) VALUES (?, ?)", (d.key, now + d.ttl_s)
            )
            return 0, 0, 0, 0
        c.execute("DELETE FROM leases WHERE counter = ? AND expires_at <= ?", (d.key, now))
        ru, rt = c.execute(
            "SELECT COALESCE(SUM(nusd), 0), COALESCE(SUM(tokens), 0) FROM leases "
            "WHERE counter = ?",
            (d.key,),
        ).fetchone()
        return int(row[1]), int(row[2]), int(ru), int(rt)

    @staticmethod
    def _extend(c: sqlite3.Connection, d: CounterDemand, now: float) -> None:
        c.execute(
            "UPDATE counters SET expires_at = max(expires_at, ?) WHERE key = ?",
            (now + d.ttl_s, d.key),
        )

    async def reserve(
        self, counters: Sequence[CounterDemand], lease_id: str, expires_at: float, now: float
    ) -> int:
        if not counters:
            return -1
        await self._ready("this tenant's budget")

        def op(c: sqlite3.Connection) -> int:
            for i, d in enumerate(counters):
                su, st, ru, rt = self._live(c, d, now)
                if d.limit_usd is not None and su + ru + _nano(d.usd) > _nano(d.limit_usd):
                    return i
                if d.limit_tokens is not None and st + rt + d.tokens > d.limit_tokens:
                    return i
            for d in counters:
                c.execute(
                    "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?)",
                    (d.key, lease_id, _nano(d.usd), d.tokens, expires_at),
                )
                self._extend(c, d, now)
            return -1

        try:
            failed = await self._tx(op)
        except _WRITE_FAILURES as exc:
            self._failed(exc)
            raise self._unavailable("this tenant's budget") from None
        self._back(0)
        return failed

    async def settle(
        self,
        counters: Sequence[CounterDemand],
        lease_id: str,
        usd: float,
        tokens: int,
        now: float,
    ) -> None:
        if not counters:
            return

        def op(c: sqlite3.Connection) -> None:
            for d in counters:
                self._live(c, d, now)
                c.execute(
                    "DELETE FROM leases WHERE counter = ? AND lease = ?", (d.key, lease_id)
                )
                c.execute(
                    "UPDATE counters SET spent_nusd = spent_nusd + ?, "
                    "spent_tokens = spent_tokens + ? WHERE key = ?",
                    (_nano(usd), tokens, d.key),
                )
                self._extend(c, d, now)

        await self._write(op)

    async def counter(self, key: str, now: float) -> CounterState:
        await self._ready("the budget counter")

        def op(c: sqlite3.Connection) -> CounterState:
            row = c.execute(
                "SELECT expires_at, spent_nusd, spent_tokens FROM counters WHERE key = ?", (key,)
            ).fetchone()
            if row is None or row[0] <= now:
                return CounterState()
            ru, rt = c.execute(
                "SELECT COALESCE(SUM(nusd), 0), COALESCE(SUM(tokens), 0) FROM leases "
                "WHERE counter = ? AND expires_at > ?",
                (key, now),
            ).fetchone()
            return CounterState(row[1] / NANO, int(row[2]), ru / NANO, int(rt))

        return await self._read(op, "the budget counter")

    # -- usage ----------------------------------------------------------------------------
    async def add_usage(
        self,
        tenant: str,
        group: Sequence[str],
        usd: float,
        prompt: int,
        completion: int,
        settle_id: str | None = None,
    ) -> None:
        # local and in-process: each update commits once (in its own transaction, or with the
        # pending ones once the file takes writes again), so there are no repeats to see
        cap = self.workflows
        if cap.applies(group) and not cap.seeded(tenant, group[0]) \
                and not cap.dropped(tenant, group[0]):  # a dropped day: its ids are not kept
            await self._seed_workflows(tenant, group[0])
        grp = SEP.join(cap.group(tenant, group))
        vals = (_nano(usd), prompt, completion, 1)

        def op(c: sqlite3.Connection) -> None:
            c.execute(_USAGE_UPSERT, (tenant, grp, *vals))

        if await self._now(op):
            return
        # kept pending, merged with the others of this tenant and group: what waits is
        # bounded by the groups in use, not by the requests served during the outage
        row = self.pending_usage.setdefault((tenant, grp), [0, 0, 0, 0])
        for i, v in enumerate(vals):
            row[i] += v
        self._ensure_retrier()

    async def _seed_workflows(self, tenant: str, day: str) -> None:
        """The workflow ids the file already holds for a tenant's day (a restart keeps the
        cap), read once per day; a file that cannot be read is tried again at the next update
        (the cap counts the ids seen meanwhile)."""
        lo, hi = day + SEP, day + chr(ord(SEP) + 1)

        def op(c: sqlite3.Connection) -> list[str]:
            rows = c.execute(
                "SELECT grp FROM usage WHERE tenant = ? AND grp >= ? AND grp < ?",
                (tenant, lo, hi),
            ).fetchall()
            return [g.split(SEP)[1] for (g,) in rows]

        try:
            ids = await self._tx(op, write=False)
        except _WRITE_FAILURES:
            return
        self.workflows.seed(tenant, day, ids)

    async def usage(self, tenant: str) -> list[UsageRow]:
        await self._ready("usage")

        def op(c: sqlite3.Connection) -> list[UsageRow]:
            rows = c.execute(
                "SELECT grp, nusd, prompt, completion, requests FROM usage WHERE tenant = ? "
                "ORDER BY grp",
                (tenant,),
            ).fetchall()
            return [
                UsageRow(tuple(g.split(SEP)), n / NANO, int(p), int(cc), int(r))
                for g, n, p, cc, r in rows
            ]

        return await self._read(op, "usage")

    async def _read(self, op: Callable[[sqlite3.Connection], T], what: str) -> T:
        try:
            return await self._tx(op, write=False)
        except _WRITE_FAILURES as exc:  # the file cannot even be opened or locked
            self._failed(exc)
            raise self._unavailable(what) from None
