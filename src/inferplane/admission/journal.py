"""`OutageJournal`: settles and usage updates waiting for Redis, kept where a restart finds them.

While Redis is unreachable, `admission.outage.OutageStore` journals each settle and usage update
instead of losing it, and replays them in order once Redis answers. This module keeps that
journal durable: each entry is one row of a SQLite file (WAL, ``synchronous=NORMAL``, as the
ledger's durable path and the local admission store: a committed row survives the process being
killed with -9; only an operating-system crash may lose the last ones), committed before the
settle returns, and deleted once Redis has applied it. A gateway restarted during an outage loads
what is left and replays it when Redis is back. Replaying an entry twice (killed between applying
and deleting it; several worker processes loading one file) is harmless: Redis applies each
settle id once (`admission.redis_state`).

Without a path the journal lives in memory (lost on a restart, as before).

Each operation is one transaction on one dedicated thread, so the event loop never waits on the
disk; ``BEGIN IMMEDIATE`` and a busy timeout make it safe for several processes to share the file
(`serve --workers`).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from inferplane.sqliteio import immediate, open_wal

T = TypeVar("T")
Payload = dict[str, Any]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    kind    TEXT NOT NULL,
    payload BLOB NOT NULL
);
"""


class OutageJournal:
    """Durable (with a path) or in-memory journal of ``(seq, kind, payload)`` entries."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        self._pool: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._seq = 0  # in memory: the last sequence number handed out

    @property
    def durable(self) -> bool:
        return self.path is not None

    def _open(self) -> sqlite3.Connection:
        assert self.path is not None
        return open_wal(self.path, _SCHEMA)

    async def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inferplane-jrnl")

        def call() -> T:
            if self._conn is None:
                self._conn = self._open()
            with immediate(self._conn):
                return fn(self._conn)

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def load(self) -> list[tuple[int, str, Payload]]:
        """The entries not yet applied, oldest first (a file left by an earlier process)."""
        if self.path is None:
            return []
        rows = await self._tx(
            lambda c: c.execute("SELECT seq, kind, payload FROM journal ORDER BY seq").fetchall()
        )
        return [(int(s), str(k), orjson.loads(p)) for s, k, p in rows]

    async def append(self, kind: str, payload: Payload) -> int:
        """Commit one entry; its sequence number."""
        if self.path is None:
            self._seq += 1
            return self._seq
        data = orjson.dumps(payload)

        def op(c: sqlite3.Connection) -> int:
            cur = c.execute("INSERT INTO journal (kind, payload) VALUES (?, ?)", (kind, data))
            assert cur.lastrowid is not None
            return cur.lastrowid

        return await self._tx(op)

    async def remove(self, seq: int) -> None:
        """The entry was applied in Redis: forget it (a missing entry is fine)."""
        if self.path is None:
            return
        await self._tx(lambda c: c.execute("DELETE FROM journal WHERE seq = ?", (seq,)))

    async def close(self) -> None:
        pool = self._pool
        if pool is None:
            return
        self._pool = None

        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(pool, shut)
        pool.shutdown(wait=True)
