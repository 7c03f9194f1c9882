"""Batch-lane state in SQLite (the embedded default): one file shared by every process of
`serve --workers N` on one host, or memory (one process).

One connection per process, used by one thread (a single-worker executor), so every operation
is serialised and never blocks the event loop on disk; processes sharing the file serialise on
SQLite's write lock (``BEGIN IMMEDIATE``, WAL). Claims, leases and exactly-once results:
`batch.store`. Lease times are this host's wall clock (`time.time`), which every process
sharing the file reads. The tables::

    batch_files  (id, tenant, purpose, filename, bytes, created_at, content)
    batches      (id, tenant, key_hash, endpoint, input_file_id, status, timestamps, metadata,
                  errors, output_file_id, error_file_id, total)
    batch_lines  (batch_id, line_no, custom_id, url, body, done, ok, result, owner,
                  lease_until)
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from inferplane.batch.store import (
    ACTIVE,
    TIMESTAMPS,
    BatchStore,
    Counts,
    Line,
    batch_object,
    dumps,
    file_object,
    new_owner,
)
from inferplane.errors import ConfigError
from inferplane.sqliteio import immediate

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batch_files (
    id         TEXT PRIMARY KEY,
    tenant     TEXT NOT NULL,
    purpose    TEXT NOT NULL,
    filename   TEXT NOT NULL,
    bytes      INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    content    BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id                TEXT PRIMARY KEY,
    tenant            TEXT NOT NULL,
    key_hash          TEXT NOT NULL,
    endpoint          TEXT NOT NULL,
    input_file_id     TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status            TEXT NOT NULL,
    metadata          TEXT,
    errors            TEXT,
    output_file_id    TEXT,
    error_file_id     TEXT,
    total             INTEGER NOT NULL DEFAULT 0,
    created_at        INTEGER NOT NULL,
    expires_at        INTEGER NOT NULL,
    in_progress_at    INTEGER,
    finalizing_at     INTEGER,
    completed_at      INTEGER,
    failed_at         INTEGER,
    expired_at        INTEGER,
    cancelling_at     INTEGER,
    cancelled_at      INTEGER
);
CREATE INDEX IF NOT EXISTS batches_by_tenant ON batches (tenant, created_at);
CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id  TEXT NOT NULL,
    line_no   INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    url       TEXT NOT NULL,
    body      BLOB NOT NULL,
    done      INTEGER NOT NULL DEFAULT 0,
    ok        INTEGER,
    result    BLOB,
    owner     TEXT,
    lease_until REAL,
    PRIMARY KEY (batch_id, line_no)
);
CREATE INDEX IF NOT EXISTS batch_lines_pending ON batch_lines (batch_id, line_no) WHERE done = 0;
"""

class SqliteBatchStore(BatchStore):
    """Files, batches and lines in one SQLite file (or in memory); async methods run on one
    dedicated thread."""

    def __init__(self, path: str | Path | None, *, clock: Callable[[], float] = time.time,
                 source: str = "<config>", field: str = "batch.path") -> None:
        self.path = str(path) if path is not None else ":memory:"
        self.source, self.field = source, field  # what names the file in a start-up error
        self.shared = path is not None
        self.owner = new_owner()
        self.clock = clock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inferplane-batch-db")
        self._conn: sqlite3.Connection | None = None

    # -- plumbing -------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        if self.path != ":memory:":
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        with immediate(conn):  # a file from before claims (checked under the write lock)
            cols = {r[1] for r in conn.execute("PRAGMA table_info(batch_lines)")}
            if "owner" not in cols:
                conn.execute("ALTER TABLE batch_lines ADD COLUMN owner TEXT")
                conn.execute("ALTER TABLE batch_lines ADD COLUMN lease_until REAL")
        return conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            if self._conn is None:
                self._conn = self._open()
            return fn(self._conn)

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def start(self) -> None:
        """Open (creating if needed) the file; one that cannot be used is a `ConfigError`
        naming the field that names it."""
        try:
            await self._run(lambda c: None)
        except sqlite3.Error as exc:
            raise ConfigError(self.source, [
                (self.field, f"{self.path}: cannot use as a batch store: {exc}")]) from None

    async def close(self) -> None:
        def shut(c: sqlite3.Connection) -> None:
            c.close()
            self._conn = None

        if self._conn is not None:
            await self._run(shut)
        self._pool.shutdown(wait=True)

    # -- files ----------------------------------------------------------------------------
    async def add_file(
        self, fid: str, tenant: str, purpose: str, filename: str, content: bytes, now: int
    ) -> dict[str, Any]:
        def op(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO batch_files VALUES (?, ?, ?, ?, ?, ?, ?)",
                (fid, tenant, purpose, filename, len(content), now, content),
            )

        await self._run(op)
        return file_object(fid, purpose, filename, len(content), now)

    async def add_file_from(
        self, fid: str, tenant: str, purpose: str, filename: str, src: BinaryIO, size: int,
        now: int,
    ) -> dict[str, Any]:
        """`add_file` from an open file, copied into the row in chunks (never whole in memory)."""

        def op(c: sqlite3.Connection) -> None:
            with immediate(c):
                c.execute(
                    "INSERT INTO batch_files VALUES (?, ?, ?, ?, ?, ?, zeroblob(?))",
                    (fid, tenant, purpose, filename, size, now, size),
                )
                rowid = c.execute("SELECT rowid FROM batch_files WHERE id = ?", (fid,)).fetchone()
                src.seek(0)
                with c.blobopen("batch_files", "content", rowid[0]) as blob:
                    while chunk := src.read(1 << 16):
                        blob.write(chunk)

        await self._run(op)
        return file_object(fid, purpose, filename, size, now)

    async def get_file(self, fid: str, tenant: str) -> dict[str, Any] | None:
        def op(c: sqlite3.Connection) -> Any:
            return c.execute(
                "SELECT id, purpose, filename, bytes, created_at FROM batch_files "
                "WHERE id = ? AND tenant = ?",
                (fid, tenant),
            ).fetchone()

        row = await self._run(op)
        return None if row is None else file_object(*row)

    async def file_content(self, fid: str, tenant: str) -> bytes | None:
        def op(c: sqlite3.Connection) -> Any:
            return c.execute(
                "SELECT content FROM batch_files WHERE id = ? AND tenant = ?", (fid, tenant)
            ).fetchone()

        row = await self._run(op)
        return None if row is None else bytes(row[0])

    # -- batches --------------------------------------------------------------------------
    async def add_batch(self, b: dict[str, Any], key_hash: str, tenant: str) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO batches (id, tenant, key_hash, endpoint, input_file_id, "
                "completion_window, status, metadata, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    b["id"], tenant, key_hash, b["endpoint"], b["input_file_id"],
                    b["completion_window"], b["status"], dumps(b["metadata"]),
                    b["created_at"], b["expires_at"],
                ),
            )

        await self._run(op)

    async def get_batch(self, bid: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The batch in OpenAI's shape (plus ``_tenant`` and ``_key_hash``), or None."""

        def op(c: sqlite3.Connection) -> dict[str, Any] | None:
            q = "SELECT * FROM batches WHERE id = ?" + (" AND tenant = ?" if tenant else "")
            cur = c.execute(q, (bid, tenant) if tenant else (bid,))
            row = cur.fetchone()
            return None if row is None else _batch(c, cur.description, row)

        return await self._run(op)

    async def list_batches(self, tenant: str, limit: int, after: str | None
                           ) -> tuple[list[dict[str, Any]], bool]:
        """The tenant's batches, newest first, after the batch ``after``; and whether more."""

        def op(c: sqlite3.Connection) -> tuple[list[dict[str, Any]], bool]:
            args: list[Any] = [tenant]
            q = "SELECT * FROM batches WHERE tenant = ?"
            if after is not None:
                q += " AND rowid < (SELECT rowid FROM batches WHERE id = ? AND tenant = ?)"
                args += [after, tenant]
            cur = c.execute(q + " ORDER BY rowid DESC LIMIT ?", (*args, limit + 1))
            rows = cur.fetchall()
            out = [_batch(c, cur.description, r) for r in rows[:limit]]
            return out, len(rows) > limit

        return await self._run(op)

    async def active_batches(self) -> list[dict[str, Any]]:
        """Batches the worker still drives, oldest first."""

        def op(c: sqlite3.Connection) -> list[dict[str, Any]]:
            marks = ", ".join("?" for _ in ACTIVE)
            cur = c.execute(
                f"SELECT * FROM batches WHERE status IN ({marks}) ORDER BY rowid", ACTIVE
            )
            return [_batch(c, cur.description, r, counts=False) for r in cur.fetchall()]

        return await self._run(op)

    async def set_status(self, bid: str, status: str, now: int, *, only_from: Sequence[str] = ()
                         ) -> bool:
        """Move a batch to ``status`` (stamping its timestamp); with ``only_from``, only from one
        of those statuses. True when it moved."""

        def op(c: sqlite3.Connection) -> bool:
            col = TIMESTAMPS.get(status)
            sets = "status = ?" + (f", {col} = ?" if col else "")
            args: list[Any] = [status] + ([now] if col else []) + [bid]
            q = f"UPDATE batches SET {sets} WHERE id = ?"
            if only_from:
                q += f" AND status IN ({', '.join('?' for _ in only_from)})"
                args += list(only_from)
            return c.execute(q, args).rowcount == 1

        return await self._run(op)

    async def start_batch(self, bid: str, lines: list[tuple[int, str, str, bytes]], now: int
                          ) -> None:
        """validating → in_progress with its lines, in one transaction (a re-run after a crash
        replaces nothing: the lines are inserted only while the batch is still validating)."""

        def op(c: sqlite3.Connection) -> None:
            with immediate(c):
                st = c.execute("SELECT status FROM batches WHERE id = ?", (bid,)).fetchone()
                if st is None or st[0] != "validating":
                    return
                c.executemany(
                    "INSERT OR IGNORE INTO batch_lines (batch_id, line_no, custom_id, url, body) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [(bid, n, cid, url, body) for n, cid, url, body in lines],
                )
                c.execute(
                    "UPDATE batches SET status = 'in_progress', in_progress_at = ?, total = ? "
                    "WHERE id = ?",
                    (now, len(lines), bid),
                )

        await self._run(op)

    async def fail_batch(self, bid: str, errors: list[dict[str, Any]], now: int) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.execute(
                "UPDATE batches SET status = 'failed', failed_at = ?, errors = ? WHERE id = ?",
                (now, dumps({"object": "list", "data": errors}), bid),
            )

        await self._run(op)

    # -- lines ----------------------------------------------------------------------------
    async def claim_lines(self, bid: str, limit: int, lease_s: float) -> list[Line]:
        def op(c: sqlite3.Connection) -> list[Line]:
            now = self.clock()
            with immediate(c):
                rows = c.execute(
                    "SELECT line_no, custom_id, url, body FROM batch_lines "
                    "WHERE batch_id = ? AND done = 0 AND (owner IS NULL OR lease_until < ?) "
                    "ORDER BY line_no LIMIT ?",
                    (bid, now, limit),
                ).fetchall()
                c.executemany(
                    "UPDATE batch_lines SET owner = ?, lease_until = ? "
                    "WHERE batch_id = ? AND line_no = ?",
                    [(self.owner, now + lease_s, bid, r[0]) for r in rows],
                )
            return [Line(bid, n, cid, url, bytes(b)) for n, cid, url, b in rows]

        return await self._run(op)

    async def renew(self, lease_s: float) -> int:
        def op(c: sqlite3.Connection) -> int:
            return c.execute(
                "UPDATE batch_lines SET lease_until = ? WHERE owner = ? AND done = 0",
                (self.clock() + lease_s, self.owner),
            ).rowcount

        return await self._run(op)

    async def release(self, lines: Sequence[Line] = ()) -> None:
        def op(c: sqlite3.Connection) -> None:
            q = "UPDATE batch_lines SET owner = NULL, lease_until = NULL " \
                "WHERE owner = ? AND done = 0"
            if not lines:
                c.execute(q, (self.owner,))
                return
            with immediate(c):
                c.executemany(q + " AND batch_id = ? AND line_no = ?",
                              [(self.owner, ln.batch_id, ln.line_no) for ln in lines])

        await self._run(op)

    async def owners(self) -> list[str]:
        def op(c: sqlite3.Connection) -> list[str]:
            return [r[0] for r in c.execute(
                "SELECT DISTINCT owner FROM batch_lines WHERE done = 0 AND owner IS NOT NULL")]

        return await self._run(op)

    async def release_owner(self, owner: str) -> int:
        def op(c: sqlite3.Connection) -> int:
            return c.execute(
                "UPDATE batch_lines SET owner = NULL, lease_until = NULL "
                "WHERE owner = ? AND done = 0", (owner,)
            ).rowcount

        return await self._run(op)

    async def open_lines(self, bid: str) -> int:
        def op(c: sqlite3.Connection) -> int:
            return int(c.execute(
                "SELECT count(*) FROM batch_lines WHERE batch_id = ? AND done = 0", (bid,)
            ).fetchone()[0])

        return await self._run(op)

    async def live_claims(self, bid: str) -> int:
        def op(c: sqlite3.Connection) -> int:
            return int(c.execute(
                "SELECT count(*) FROM batch_lines WHERE batch_id = ? AND done = 0 "
                "AND owner IS NOT NULL AND lease_until >= ?", (bid, self.clock())
            ).fetchone()[0])

        return await self._run(op)

    async def finish_line(self, bid: str, line_no: int, ok: bool, result: bytes) -> bool:
        marks = ", ".join("?" for _ in ACTIVE)

        def op(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "UPDATE batch_lines SET done = 1, ok = ?, result = ?, lease_until = NULL "
                "WHERE batch_id = ? AND line_no = ? AND done = 0 AND owner = ? "
                f"AND EXISTS (SELECT 1 FROM batches WHERE id = ? AND status IN ({marks}))",
                (1 if ok else 0, result, bid, line_no, self.owner, bid, *ACTIVE),
            )
            return cur.rowcount == 1

        return await self._run(op)

    async def finalize(
        self,
        bid: str,
        status: str,
        now: int,
        file_ids: tuple[str, str],
        leftover: Callable[[int, str], bytes] | None = None,
    ) -> None:
        """Write the output and error files from the done lines (plus ``leftover(line_no,
        custom_id)`` error lines for lines never done, when given) and set the final status, in
        one transaction. A file with no lines is not created (its id stays null)."""

        def op(c: sqlite3.Connection) -> None:
            with immediate(c):
                row = c.execute(
                    "SELECT tenant, status FROM batches WHERE id = ?", (bid,)
                ).fetchone()
                if row is None or row[1] not in ACTIVE:
                    return
                tenant = row[0]
                out: list[bytes] = []
                err: list[bytes] = []
                for n, cid, done, ok, result in c.execute(
                    "SELECT line_no, custom_id, done, ok, result FROM batch_lines "
                    "WHERE batch_id = ? ORDER BY line_no",
                    (bid,),
                ):
                    if done:
                        (out if ok else err).append(bytes(result))
                    elif leftover is not None:
                        err.append(leftover(n, cid))
                ids: list[str | None] = []
                for fid, lines, name in (
                    (file_ids[0], out, f"{bid}_output.jsonl"),
                    (file_ids[1], err, f"{bid}_error.jsonl"),
                ):
                    if not lines:
                        ids.append(None)
                        continue
                    content = b"\n".join(lines) + b"\n"
                    c.execute(
                        "INSERT INTO batch_files VALUES (?, ?, 'batch_output', ?, ?, ?, ?)",
                        (fid, tenant, name, len(content), now, content),
                    )
                    ids.append(fid)
                col = TIMESTAMPS[status]
                c.execute(
                    f"UPDATE batches SET status = ?, {col} = ?, output_file_id = ?, "
                    "error_file_id = ? WHERE id = ?",
                    (status, now, ids[0], ids[1], bid),
                )

        await self._run(op)


def _counts(c: sqlite3.Connection, bid: str, total: int) -> Counts:
    done_ok, done_bad = c.execute(
        "SELECT COALESCE(SUM(done AND ok), 0), COALESCE(SUM(done AND NOT ok), 0) "
        "FROM batch_lines WHERE batch_id = ?",
        (bid,),
    ).fetchone()
    return Counts(total, int(done_ok), int(done_bad))


def _batch(c: sqlite3.Connection, description: Any, row: Sequence[Any], *, counts: bool = True
           ) -> dict[str, Any]:
    """A batch row in OpenAI's shape; ``counts=False`` skips counting its lines (the worker's
    rounds do not read them) and reports zeros."""
    r = {d[0]: v for d, v in zip(description, row, strict=True)}
    n = _counts(c, r["id"], r["total"]) if counts else Counts(r["total"], 0, 0)
    return batch_object(r, n)
