"""Batch-lane state in PostgreSQL (``batch.postgres_dsn``): shared by gateway replicas.

psycopg 3, async, one connection per process (autocommit; multi-statement operations in
explicit transactions), reconnected after a failure. Claims, leases and exactly-once results:
`batch.store`. Lease times are the database server's clock (``clock_timestamp()``), so replicas
on hosts whose clocks differ agree on when a lease expired.

Tables live in ``batch.postgres_schema`` with names prefixed by ``batch.table_prefix``:
``<prefix>schema_version``, ``<prefix>files`` and ``<prefix>file_chunks`` (a file's content in
1 MiB chunks: an upload is copied in without being held whole in memory), ``<prefix>batches``
and ``<prefix>lines``. Migrations run at start under an advisory lock, each in its own
transaction, as the PostgreSQL ledger's do (`ledger.postgres`), so replicas may start at once.
A database unreachable at start is a start-up error naming ``batch.postgres_dsn``; one that goes
away later fails the batch routes with 503 ``store_unavailable`` and pauses the batch worker
(its rounds fail and retry) — claims then expire and are taken over once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, BinaryIO, TypeVar

import psycopg

from inferplane import pgschema
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
from inferplane.errors import ConfigError, StoreUnavailableError, first_line
from inferplane.pgschema import PgTables

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]

SCHEMA_VERSION = 1
CHUNK = 1 << 20

_BATCH_COLS = (
    "id, tenant, key_hash, endpoint, input_file_id, completion_window, status, metadata, "
    "errors, output_file_id, error_file_id, total, created_at, expires_at, in_progress_at, "
    "finalizing_at, completed_at, failed_at, expired_at, cancelling_at, cancelled_at"
)
_NAMES = [c.strip() for c in _BATCH_COLS.split(",")]


class Tables(PgTables):
    """Quoted, qualified table names (schema and prefix are checked identifiers)."""

    def __init__(self, schema: str, prefix: str) -> None:
        super().__init__(schema, prefix, part="batch",
                         fields=("batch.postgres_schema", "batch.table_prefix"))
        self.files = self.table("files")
        self.chunks = self.table("file_chunks")
        self.batches = self.table("batches")
        self.lines = self.table("lines")

    def migrations(self) -> list[list[str]]:
        """Migration ``i`` takes the schema from version ``i`` to ``i + 1``."""
        p = self.prefix
        return [[
            f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"',
            f"""CREATE TABLE {self.files} (
                id TEXT PRIMARY KEY, tenant TEXT NOT NULL, purpose TEXT NOT NULL,
                filename TEXT NOT NULL, bytes BIGINT NOT NULL, created_at BIGINT NOT NULL)""",
            f"""CREATE TABLE {self.chunks} (
                file_id TEXT NOT NULL REFERENCES {self.files} (id) ON DELETE CASCADE,
                seq INTEGER NOT NULL, data BYTEA NOT NULL, PRIMARY KEY (file_id, seq))""",
            f"""CREATE TABLE {self.batches} (
                seq BIGSERIAL UNIQUE, id TEXT PRIMARY KEY, tenant TEXT NOT NULL,
                key_hash TEXT NOT NULL, endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL,
                completion_window TEXT NOT NULL, status TEXT NOT NULL, metadata TEXT,
                errors TEXT, output_file_id TEXT, error_file_id TEXT,
                total INTEGER NOT NULL DEFAULT 0, created_at BIGINT NOT NULL,
                expires_at BIGINT NOT NULL, in_progress_at BIGINT, finalizing_at BIGINT,
                completed_at BIGINT, failed_at BIGINT, expired_at BIGINT,
                cancelling_at BIGINT, cancelled_at BIGINT)""",
            f'CREATE INDEX "{p}batches_by_tenant" ON {self.batches} (tenant, seq)',
            f'CREATE INDEX "{p}batches_active" ON {self.batches} (seq) WHERE status IN '
            "('validating', 'in_progress', 'finalizing', 'cancelling')",
            f"""CREATE TABLE {self.lines} (
                batch_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT NOT NULL,
                url TEXT NOT NULL, body BYTEA NOT NULL, done BOOLEAN NOT NULL DEFAULT false,
                ok BOOLEAN, result BYTEA, owner TEXT, lease_until TIMESTAMPTZ,
                PRIMARY KEY (batch_id, line_no))""",
            f'CREATE INDEX "{p}lines_open" ON {self.lines} (batch_id, line_no) WHERE NOT done',
            f'CREATE INDEX "{p}lines_owner" ON {self.lines} (owner) WHERE NOT done',
        ]]


async def migrate(conn: Conn, t: Tables) -> int:
    """Bring the tables to `SCHEMA_VERSION` (under an advisory lock); return the version."""
    return await pgschema.migrate(conn, t, t.migrations()[:SCHEMA_VERSION])


class PostgresBatchStore(BatchStore):
    """Files, batches and lines in PostgreSQL (see the module docstring)."""

    def __init__(
        self, dsn: str, *, schema: str = "public", prefix: str = "inferplane_batch_",
        source: str = "<config>",
    ) -> None:
        self.dsn = dsn
        self.source = source
        try:
            self.t = Tables(schema, prefix)
        except ValueError as exc:
            raise ConfigError(source, [("batch.postgres_schema", str(exc))]) from None
        self.owner = new_owner()
        self.shared = True
        self._conn: Conn | None = None
        self._lock = asyncio.Lock()

    # -- plumbing -------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and migrate. A DSN that does not connect is a `ConfigError`."""
        try:
            self._conn = await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, connect_timeout=5
            )
            await migrate(self._conn, self.t)
        except psycopg.Error as exc:
            await self.close()
            raise ConfigError(self.source, [(
                "batch.postgres_dsn", f"cannot use the database: {first_line(exc, typed=True)}"
            )]) from None

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
        self._conn = None

    async def _run(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """``fn(connection)``, one operation at a time; a database error is a 503
        (`StoreUnavailableError`) and the connection is opened again next time."""
        async with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await psycopg.AsyncConnection.connect(
                        self.dsn, autocommit=True, connect_timeout=5
                    )
                return await fn(self._conn)
            except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
                if self._conn is not None and (self._conn.broken or self._conn.closed):
                    with contextlib.suppress(Exception):
                        await self._conn.close()
                    self._conn = None
                raise StoreUnavailableError(
                    f"the batch store (PostgreSQL) is unavailable: {first_line(exc, typed=True)}"
                ) from None

    @contextlib.asynccontextmanager
    async def _tx(self, c: Conn) -> AsyncIterator[psycopg.AsyncCursor[Any]]:
        async with c.transaction(), c.cursor() as cur:
            yield cur

    # -- files ----------------------------------------------------------------------------
    async def add_file(
        self, fid: str, tenant: str, purpose: str, filename: str, content: bytes, now: int
    ) -> dict[str, Any]:
        async def op(c: Conn) -> None:
            async with self._tx(c) as cur:
                await self._insert_file(cur, fid, tenant, purpose, filename, content, now)

        await self._run(op)
        return file_object(fid, purpose, filename, len(content), now)

    async def _insert_file(
        self, cur: psycopg.AsyncCursor[Any], fid: str, tenant: str, purpose: str, filename: str,
        content: bytes, now: int,
    ) -> None:
        await cur.execute(f"INSERT INTO {self.t.files} VALUES (%s, %s, %s, %s, %s, %s)",
                          (fid, tenant, purpose, filename, len(content), now))
        await cur.executemany(
            f"INSERT INTO {self.t.chunks} (file_id, seq, data) VALUES (%s, %s, %s)",
            [(fid, i, content[o:o + CHUNK]) for i, o in enumerate(range(0, len(content), CHUNK))],
        )

    async def add_file_from(
        self, fid: str, tenant: str, purpose: str, filename: str, src: BinaryIO, size: int,
        now: int,
    ) -> dict[str, Any]:
        async def op(c: Conn) -> None:
            async with self._tx(c) as cur:
                await cur.execute(f"INSERT INTO {self.t.files} VALUES (%s, %s, %s, %s, %s, %s)",
                                  (fid, tenant, purpose, filename, size, now))
                src.seek(0)
                seq = 0
                while chunk := await asyncio.to_thread(src.read, CHUNK):
                    await cur.execute(
                        f"INSERT INTO {self.t.chunks} (file_id, seq, data) VALUES (%s, %s, %s)",
                        (fid, seq, chunk))
                    seq += 1

        await self._run(op)
        return file_object(fid, purpose, filename, size, now)

    async def get_file(self, fid: str, tenant: str) -> dict[str, Any] | None:
        async def op(c: Conn) -> Any:
            cur = await c.execute(
                f"SELECT id, purpose, filename, bytes, created_at FROM {self.t.files} "
                "WHERE id = %s AND tenant = %s", (fid, tenant))
            return await cur.fetchone()

        row = await self._run(op)
        return None if row is None else file_object(*row)

    async def file_content(self, fid: str, tenant: str) -> bytes | None:
        async def op(c: Conn) -> bytes | None:
            cur = await c.execute(
                f"SELECT 1 FROM {self.t.files} WHERE id = %s AND tenant = %s", (fid, tenant))
            if await cur.fetchone() is None:
                return None
            cur = await c.execute(
                f"SELECT data FROM {self.t.chunks} WHERE file_id = %s ORDER BY seq", (fid,))
            return b"".join(bytes(r[0]) for r in await cur.fetchall())

        return await self._run(op)

    # -- batches --------------------------------------------------------------------------
    async def add_batch(self, b: dict[str, Any], key_hash: str, tenant: str) -> None:
        async def op(c: Conn) -> None:
            await c.execute(
                f"INSERT INTO {self.t.batches} (id, tenant, key_hash, endpoint, input_file_id, "
                "completion_window, status, metadata, created_at, expires_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (b["id"], tenant, key_hash, b["endpoint"], b["input_file_id"],
                 b["completion_window"], b["status"], dumps(b["metadata"]), b["created_at"],
                 b["expires_at"]))

        await self._run(op)

    async def _counts(self, c: Conn, bid: str, total: int) -> Counts:
        cur = await c.execute(
            f"SELECT count(*) FILTER (WHERE done AND ok), count(*) FILTER (WHERE done AND NOT "
            f"ok) FROM {self.t.lines} WHERE batch_id = %s", (bid,))
        row = await cur.fetchone()
        assert row is not None
        return Counts(total, int(row[0]), int(row[1]))

    async def _objects(self, c: Conn, rows: Sequence[Sequence[Any]], counts: bool = True
                       ) -> list[dict[str, Any]]:
        out = []
        for row in rows:
            r = dict(zip(_NAMES, row, strict=True))
            n = await self._counts(c, r["id"], r["total"]) if counts else Counts(r["total"], 0, 0)
            out.append(batch_object(r, n))
        return out

    async def get_batch(self, bid: str, tenant: str | None = None) -> dict[str, Any] | None:
        async def op(c: Conn) -> dict[str, Any] | None:
            q = f"SELECT {_BATCH_COLS} FROM {self.t.batches} WHERE id = %s"
            cur = await c.execute(q + (" AND tenant = %s" if tenant else ""),
                                  (bid, tenant) if tenant else (bid,))
            row = await cur.fetchone()
            return None if row is None else (await self._objects(c, [row]))[0]

        return await self._run(op)

    async def list_batches(
        self, tenant: str, limit: int, after: str | None
    ) -> tuple[list[dict[str, Any]], bool]:
        async def op(c: Conn) -> tuple[list[dict[str, Any]], bool]:
            args: list[Any] = [tenant]
            q = f"SELECT {_BATCH_COLS} FROM {self.t.batches} WHERE tenant = %s"
            if after is not None:
                q += (f" AND seq < (SELECT seq FROM {self.t.batches} WHERE id = %s "
                      "AND tenant = %s)")
                args += [after, tenant]
            cur = await c.execute(q + " ORDER BY seq DESC LIMIT %s", (*args, limit + 1))
            rows = await cur.fetchall()
            return await self._objects(c, rows[:limit]), len(rows) > limit

        return await self._run(op)

    async def active_batches(self) -> list[dict[str, Any]]:
        async def op(c: Conn) -> list[dict[str, Any]]:
            cur = await c.execute(
                f"SELECT {_BATCH_COLS} FROM {self.t.batches} WHERE status IN "
                "('validating', 'in_progress', 'finalizing', 'cancelling') ORDER BY seq")
            return await self._objects(c, await cur.fetchall(), counts=False)

        return await self._run(op)

    async def set_status(
        self, bid: str, status: str, now: int, *, only_from: Sequence[str] = ()
    ) -> bool:
        async def op(c: Conn) -> bool:
            col = TIMESTAMPS.get(status)
            sets = "status = %s" + (f", {col} = %s" if col else "")
            args: list[Any] = [status] + ([now] if col else []) + [bid]
            q = f"UPDATE {self.t.batches} SET {sets} WHERE id = %s"
            if only_from:
                q += " AND status = ANY(%s)"
                args.append(list(only_from))
            cur = await c.execute(q, args)
            return cur.rowcount == 1

        return await self._run(op)

    async def start_batch(
        self, bid: str, lines: list[tuple[int, str, str, bytes]], now: int
    ) -> None:
        async def op(c: Conn) -> None:
            async with self._tx(c) as cur:
                await cur.execute(
                    f"SELECT status FROM {self.t.batches} WHERE id = %s FOR UPDATE", (bid,))
                st = await cur.fetchone()
                if st is None or st[0] != "validating":
                    return
                async with cur.copy(
                    f"COPY {self.t.lines} (batch_id, line_no, custom_id, url, body) FROM STDIN"
                ) as copy:
                    for n, cid, url, body in lines:
                        await copy.write_row((bid, n, cid, url, body))
                await cur.execute(
                    f"UPDATE {self.t.batches} SET status = 'in_progress', in_progress_at = %s, "
                    "total = %s WHERE id = %s", (now, len(lines), bid))

        await self._run(op)

    async def fail_batch(self, bid: str, errors: list[dict[str, Any]], now: int) -> None:
        async def op(c: Conn) -> None:
            await c.execute(
                f"UPDATE {self.t.batches} SET status = 'failed', failed_at = %s, errors = %s "
                "WHERE id = %s", (now, dumps({"object": "list", "data": errors}), bid))

        await self._run(op)

    # -- lines ----------------------------------------------------------------------------
    async def claim_lines(self, bid: str, limit: int, lease_s: float) -> list[Line]:
        t = self.t

        async def op(c: Conn) -> list[Line]:
            cur = await c.execute(
                f"UPDATE {t.lines} SET owner = %s, "
                "lease_until = clock_timestamp() + %s * interval '1 second' "
                f"WHERE (batch_id, line_no) IN (SELECT batch_id, line_no FROM {t.lines} "
                "WHERE batch_id = %s AND NOT done "
                "AND (owner IS NULL OR lease_until < clock_timestamp()) "
                "ORDER BY line_no LIMIT %s FOR UPDATE SKIP LOCKED) "
                "RETURNING line_no, custom_id, url, body",
                (self.owner, lease_s, bid, limit))
            rows = sorted(await cur.fetchall())
            return [Line(bid, n, cid, url, bytes(b)) for n, cid, url, b in rows]

        return await self._run(op)

    async def renew(self, lease_s: float) -> int:
        async def op(c: Conn) -> int:
            cur = await c.execute(
                f"UPDATE {self.t.lines} SET lease_until = clock_timestamp() + %s * interval "
                "'1 second' WHERE owner = %s AND NOT done", (lease_s, self.owner))
            return cur.rowcount

        return await self._run(op)

    async def release(self, lines: Sequence[Line] = ()) -> None:
        q = (f"UPDATE {self.t.lines} SET owner = NULL, lease_until = NULL "
             "WHERE owner = %s AND NOT done")

        async def op(c: Conn) -> None:
            if not lines:
                await c.execute(q, (self.owner,))
                return
            async with self._tx(c) as cur:
                await cur.executemany(q + " AND batch_id = %s AND line_no = %s",
                                      [(self.owner, ln.batch_id, ln.line_no) for ln in lines])

        await self._run(op)

    async def owners(self) -> list[str]:
        async def op(c: Conn) -> list[str]:
            cur = await c.execute(
                f"SELECT DISTINCT owner FROM {self.t.lines} WHERE NOT done AND owner IS NOT NULL")
            return [r[0] for r in await cur.fetchall()]

        return await self._run(op)

    async def release_owner(self, owner: str) -> int:
        async def op(c: Conn) -> int:
            cur = await c.execute(
                f"UPDATE {self.t.lines} SET owner = NULL, lease_until = NULL "
                "WHERE owner = %s AND NOT done", (owner,))
            return cur.rowcount

        return await self._run(op)

    async def open_lines(self, bid: str) -> int:
        async def op(c: Conn) -> int:
            cur = await c.execute(
                f"SELECT count(*) FROM {self.t.lines} WHERE batch_id = %s AND NOT done", (bid,))
            row = await cur.fetchone()
            return int(row[0]) if row else 0

        return await self._run(op)

    async def live_claims(self, bid: str) -> int:
        async def op(c: Conn) -> int:
            cur = await c.execute(
                f"SELECT count(*) FROM {self.t.lines} WHERE batch_id = %s AND NOT done "
                "AND owner IS NOT NULL AND lease_until >= clock_timestamp()", (bid,))
            row = await cur.fetchone()
            return int(row[0]) if row else 0

        return await self._run(op)

    async def finish_line(self, bid: str, line_no: int, ok: bool, result: bytes) -> bool:
        async def op(c: Conn) -> bool:
            async with self._tx(c) as cur:
                # serialised with `finalize` on the batch row: no result after the files
                await cur.execute(
                    f"SELECT status FROM {self.t.batches} WHERE id = %s FOR SHARE", (bid,))
                st = await cur.fetchone()
                if st is None or st[0] not in ACTIVE:
                    return False
                await cur.execute(
                    f"UPDATE {self.t.lines} SET done = true, ok = %s, result = %s, "
                    "lease_until = NULL WHERE batch_id = %s AND line_no = %s AND NOT done "
                    "AND owner = %s", (ok, result, bid, line_no, self.owner))
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
        t = self.t

        async def op(c: Conn) -> None:
            async with self._tx(c) as cur:
                await cur.execute(
                    f"SELECT tenant, status FROM {t.batches} WHERE id = %s FOR UPDATE", (bid,))
                row = await cur.fetchone()
                if row is None or row[1] not in ACTIVE:
                    return
                tenant = row[0]
                out: list[bytes] = []
                err: list[bytes] = []
                await cur.execute(
                    f"SELECT line_no, custom_id, done, ok, result FROM {t.lines} "
                    "WHERE batch_id = %s ORDER BY line_no", (bid,))
                for n, cid, done, ok, result in await cur.fetchall():
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
                    await self._insert_file(cur, fid, tenant, "batch_output", name, content, now)
                    ids.append(fid)
                col = TIMESTAMPS[status]
                await cur.execute(
                    f"UPDATE {t.batches} SET status = %s, {col} = %s, output_file_id = %s, "
                    "error_file_id = %s WHERE id = %s", (status, now, ids[0], ids[1], bid))

        await self._run(op)
