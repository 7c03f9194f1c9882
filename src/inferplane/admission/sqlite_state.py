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
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from inferplane.admission.state import (
    SEP,
    CounterDemand,
    CounterState,
    MemoryStore,
    UsageRow,
)
from inferplane.sqliteio import immediate, open_wal

T = TypeVar("T")
NANO = 1_000_000_000

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

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = str(path)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inferplane-adm-db")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    # -- plumbing -------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        return open_wal(self.path, _SCHEMA)

    async def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one immediate transaction on the store's thread."""

        def call() -> T:
            if self._conn is None:
                self._conn = self._open()
            with immediate(self._conn):
                return fn(self._conn)

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def ping(self) -> bool:
        """Open the file (and create its tables) now, so an unwritable path fails at start."""
        await self._tx(lambda c: None)
        return True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

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

        return await self._tx(op)

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

        await self._tx(op)

    async def counter(self, key: str, now: float) -> CounterState:
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

        return await self._tx(op)

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
        # local and in-process: each update commits once, in its own transaction; no
        # journal replays it, so there are no repeats to see
        def op(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO usage VALUES (?, ?, ?, ?, ?, 1) ON CONFLICT (tenant, grp) DO UPDATE "
                "SET nusd = nusd + excluded.nusd, prompt = prompt + excluded.prompt, "
                "completion = completion + excluded.completion, requests = requests + 1",
                (tenant, SEP.join(group), _nano(usd), prompt, completion),
            )

        await self._tx(op)

    async def usage(self, tenant: str) -> list[UsageRow]:
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

        return await self._tx(op)
