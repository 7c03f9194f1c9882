"""A PostgreSQL decision ledger: shared by replicas, queryable, hash-chained like SQLite's.

``record()`` encodes the record (its receipt is known at once) and queues it; a writer task on
the gateway's event loop commits whatever is pending (psycopg 3, async) in one transaction per
batch of at most ``batch_size`` records: it locks its shard's head row (``SELECT … FOR UPDATE``,
so replicas sharing a shard chain one after another and never fork it), chains the batch, writes
it with ``COPY``, moves the head and adds the checkpoints the batch crossed. While it commits the
next records gather (group commit); ``await receipt.durable()`` returns once the record's
transaction committed.

Tables live in ``postgres_schema`` with names prefixed by ``table_prefix``:
``<prefix>schema_version``, ``<prefix>decisions``, ``<prefix>heads``, ``<prefix>checkpoints``.
Migrations run at start under an advisory lock, each in its own transaction, so several replicas
may start at once; a writer brings the tables to `WRITER_VERSION`, the first prune to
`SCHEMA_VERSION`. A database that is unreachable at start is a start-up error; one that goes
away later only delays records (they stay pending, the writer retries, nothing is lost until
``max_pending``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any

import psycopg

from inferplane import pgschema
from inferplane.errors import ConfigError, first_line
from inferplane.ledger.chain import GENESIS, Checkpoint, PruneAnchor, Signer
from inferplane.ledger.query import (
    EXPORT_SCHEMA,
    ExportRow,
    Page,
    Query,
    anchor_lines,
    page_of,
    parquet_schema,
    where_clause,
)
from inferplane.ledger.record import Outcome, Receipt
from inferplane.ledger.spool import Spool, refusal
from inferplane.ledger.sqlite import merge_records
from inferplane.ledger.writer import (
    CommitAccounting,
    Linked,
    Pending,
    PendingBuffer,
    link,
    settle,
)
from inferplane.lograte import LogLimiter
from inferplane.pgschema import PgTables
from inferplane.placement.framework import Decision
from inferplane.waits import wait_woken

log = logging.getLogger("inferplane.ledger")

SCHEMA_VERSION = 3
"""The newest version this code reads and writes (3: the prune anchors' table)."""
WRITER_VERSION = 2
"""What a gateway's start brings the tables to: the first prune takes them to 3, so that until
then an older gateway still starts on them (version 3 means: possibly pruned)."""
READABLE_VERSIONS = (2, 3)
"""What readers read as they stand (a version-2 ledger was never pruned)."""

_EXPORT_COLS = (
    "id, shard, chain_seq, decision_id, at_unix, tenant, workload_class, model, substrate, "
    "endpoint, status, cost_usd, receipt, prev_hash, chain_hash, record, ttft_s"
)
_COPY_COLS = (
    "decision_id, at_unix, tenant, endpoint, workload_class, model, substrate, status, ttft_s, "
    "cost_usd, shard, chain_seq, receipt, prev_hash, chain_hash, record"
)


class Tables(PgTables):
    """Quoted, qualified table names of one ledger (schema and prefix are checked identifiers)."""

    def __init__(self, schema: str, prefix: str) -> None:
        super().__init__(schema, prefix, part="ledger", fields=("postgres_schema", "table_prefix"))
        self.decisions = self.table("decisions")
        self.heads = self.table("heads")
        self.checkpoints = self.table("checkpoints")
        self.anchors = self.table("prune_anchors")

    def migrations(self) -> list[list[str]]:
        """Migration ``i`` takes the schema from version ``i`` to ``i + 1``."""
        p = self.prefix
        return [[
            f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"',
            f"""CREATE TABLE {self.decisions} (
                id             BIGSERIAL PRIMARY KEY,
                decision_id    TEXT NOT NULL,
                at_unix        DOUBLE PRECISION NOT NULL,
                tenant         TEXT NOT NULL,
                endpoint       TEXT,
                workload_class TEXT,
                model          TEXT,
                substrate      TEXT,
                status         INTEGER,
                ttft_s         DOUBLE PRECISION,
                cost_usd       DOUBLE PRECISION,
                shard          TEXT NOT NULL,
                chain_seq      BIGINT NOT NULL,
                receipt        TEXT NOT NULL,
                prev_hash      TEXT NOT NULL,
                chain_hash     TEXT NOT NULL,
                record         TEXT NOT NULL,
                UNIQUE (shard, chain_seq))""",
            f'CREATE INDEX "{p}decisions_by_id" ON {self.decisions} (decision_id)',
            f'CREATE INDEX "{p}decisions_by_tenant" ON {self.decisions} (tenant, id)',
            f'CREATE INDEX "{p}decisions_by_time" ON {self.decisions} (at_unix)',
            f"""CREATE TABLE {self.heads} (
                shard TEXT PRIMARY KEY, seq BIGINT NOT NULL, chain_hash TEXT NOT NULL)""",
            f"""CREATE TABLE {self.checkpoints} (
                id BIGSERIAL PRIMARY KEY, shard TEXT NOT NULL, seq BIGINT NOT NULL,
                chain_hash TEXT NOT NULL, at_unix DOUBLE PRECISION NOT NULL,
                key_id TEXT NOT NULL, signature TEXT NOT NULL)""",
        ], [
            # 2: keep records compressed inside the row (STORAGE MAIN) instead of in the TOAST
            # table: reading a record then needs no TOAST lookup (1.7x faster exports, measured)
            f"ALTER TABLE {self.decisions} ALTER COLUMN record SET STORAGE MAIN",
        ], [
            # 3: the signed starts of pruned chains (`inferplane ledger-prune`); additive
            f"""CREATE TABLE {self.anchors} (
                id BIGSERIAL PRIMARY KEY, shard TEXT NOT NULL, first_seq BIGINT NOT NULL,
                prev_hash TEXT NOT NULL, before_unix DOUBLE PRECISION NOT NULL,
                at_unix DOUBLE PRECISION NOT NULL, key_id TEXT NOT NULL,
                signature TEXT NOT NULL)""",
        ]]


_TCP: dict[str, Any] = {
    "connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
    "keepalives_count": 3, "tcp_user_timeout": 30_000,
}
"""The writer's connection settings: a database host that vanishes (a failover that moves its
address, no RST) fails a write within ~30 s instead of when the kernel gives up on the TCP
connection (minutes)."""


def _config_error(source: str, msg: str) -> ConfigError:
    return ConfigError(source, [("ledger.postgres_dsn", msg)])


class PostgresLedger(CommitAccounting):
    """Decision records in PostgreSQL (see the module docstring)."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "public",
        prefix: str = "inferplane_",
        shard: str = "main",
        signer: Signer | None = None,
        checkpoint_every: int = 1000,
        checkpoint_interval_s: float = 60.0,
        batch_size: int = 256,
        max_pending: int = 100_000,
        retry_interval_s: float = 1.0,
        flush_interval_s: float = 0.2,
        source: str = "<config>",
        spool_path: str | None = None,
        stall_timeout_s: float | None = None,
    ) -> None:
        self.dsn = dsn
        self.stall_timeout_s = stall_timeout_s
        self._inflight_since: float | None = None  # monotonic start of the write in flight
        try:
            self.t = Tables(schema, prefix)
        except ValueError as exc:
            raise _config_error(source, str(exc)) from None
        self.shard = shard
        self.signer = signer
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval_s = checkpoint_interval_s
        self.batch_size = batch_size
        self.retry_interval_s = retry_interval_s
        self.flush_interval_s = flush_interval_s
        self.source = source
        self.batches_written = 0
        self.records_written = 0
        self.checkpoints_written = 0
        self.write_errors = 0
        self._buf = PendingBuffer(max_pending, f"postgres:{schema}.{prefix}")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._writer: psycopg.AsyncConnection[Any] | None = None
        self._reader: psycopg.AsyncConnection[Any] | None = None
        self._read_lock: asyncio.Lock | None = None
        self._stopping = False
        self._unsigned = False
        self._last_checkpoint = time.monotonic()
        self._last_warning = float("-inf")
        self.log_name = "ledger postgres"
        self.records_spooled = 0
        self._spool: Spool | None = None
        self._spooled = 0  # records in the spool file (as this process last saw it)
        self._spool_failing = False  # the last attempt to add to the spool failed
        self.spool_errors = 0
        self.spool_refused = 0
        """Spooled records the replay refused (`spool.refusal`): moved to the file's
        ``refused`` table, never written."""
        self._spool_log = LogLimiter(log, 60.0)
        if spool_path is not None:
            try:
                self._spool = Spool(spool_path)
                self._spooled = self._spool.count()
            except (OSError, sqlite3.Error) as exc:
                raise ConfigError(source, [("ledger.spool_path", f"{spool_path}: {exc}")]
                                  ) from None

    @property
    def dropped(self) -> int:
        return self._buf.dropped

    @property
    def pending(self) -> int:
        return len(self._buf)

    @property
    def store_down(self) -> bool:
        """Answers need not wait: the database is down and no spool holds their records
        (with a spool, an answer waits for its record to be spooled, milliseconds, unless
        the spool cannot be written either)."""
        return self.stalled or (
            self._down_since is not None and (self._spool is None or self._spool_failing))

    @property
    def stalled(self) -> bool:
        """A write (or its connect) has been in flight for ``stall_timeout_s`` or longer (the
        gateway passes ``ledger.commit_timeout_s``): a hung connection counts as the database
        being down, so answers stop waiting for it."""
        since = self._inflight_since
        return (since is not None and self.stall_timeout_s is not None
                and time.monotonic() - since >= self.stall_timeout_s)

    @property
    def writes_failing(self) -> bool:
        return self._down_since is not None or self.stalled

    @property
    def spooled(self) -> int:
        """Records in the spool file, waiting for the database."""
        return self._spooled

    # -- the request path -----------------------------------------------------------------
    def record(self, decision: Decision, outcome: Outcome, at_unix: float) -> Receipt:
        receipt, _ = self._buf.record(decision, outcome, at_unix)
        if self._wake is not None:
            self._wake.set()
        return receipt

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, migrate, start the writer. A DSN that does not connect is a `ConfigError`."""
        if self._task is not None:
            return
        try:
            self._writer = await psycopg.AsyncConnection.connect(self.dsn, **_TCP)
            self._reader = await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, connect_timeout=5
            )
            await migrate(self._writer, self.t)
        except psycopg.Error as exc:
            await self._close_connections()
            raise _config_error(
                self.source, f"cannot use the database: {first_line(exc)}"
            ) from None
        self._wake = asyncio.Event()
        self._read_lock = asyncio.Lock()
        self._task = asyncio.create_task(self._run(), name="ledger-writer:postgres")

    async def close(self) -> None:
        """Write what is pending (checkpointing the end), stop the writer, disconnect."""
        if self._task is None:
            return
        self._stopping = True
        assert self._wake is not None
        self._wake.set()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        except Exception:  # never raise from close: what is pending is still written below
            log.exception("ledger postgres: the writer task failed")
        self._task = None
        ok = await self._replay() and await self.flush(sign_last=True)
        if ok and self._unsigned and self.signer is not None:
            await self._write([], sign_last=True)
        if not ok and self._spool is not None and await self._spool_pending():
            log.error("ledger postgres: closing with %d unwritten records in the spool %s "
                      "(written at the next start that uses this file)", self._spooled,
                      self._spool.path)
        lost = 0 if ok else self._buf.clear()
        if lost:
            log.error("ledger postgres: closing with %d unwritten records (dropped)", lost)
        await self._close_connections()
        if self._spool is not None:
            try:
                self._spool.close()
            except sqlite3.Error as exc:
                log.warning("ledger postgres: closing the spool %s: %s", self._spool.path, exc)

    async def _close_connections(self) -> None:
        for conn in (self._writer, self._reader):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self._writer = self._reader = None

    async def flush(self, sign_last: bool = False) -> bool:
        while len(self._buf):
            last = len(self._buf) <= self.batch_size
            batch = self._buf.take(self.batch_size)
            if not await self._write(batch, sign_last and last):
                return False
        return True

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            await wait_woken(self._wake, self.flush_interval_s)
            self._wake.clear()
            if self._stopping:
                break
            if self._spool is not None and self._down_since is not None:
                await self._spool_pending()  # first: the retry below may wait to connect
            due = time.monotonic() - self._last_checkpoint >= self.checkpoint_interval_s
            ok = await self._replay() and await self.flush(sign_last=due)
            if ok and due and self._unsigned and self.signer is not None:
                ok = await self._write([], sign_last=True)
            if not ok:
                await self._wait_for_retry()

    async def _wait_for_retry(self) -> None:
        """Wait ``retry_interval_s`` before the next try; with a spool, move every record that
        arrives meanwhile into it at once (its answer waits for that)."""
        if self._spool is None:
            await asyncio.sleep(self.retry_interval_s)
            return
        assert self._wake is not None
        deadline = time.monotonic() + self.retry_interval_s
        while not self._stopping:
            await self._spool_pending()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await wait_woken(self._wake, left)
            self._wake.clear()

    async def _spool_pending(self) -> bool:
        """Move the pending records into the spool, oldest first; True when they are there."""
        assert self._spool is not None
        batch = self._buf.take(len(self._buf))
        if not batch:
            return True
        try:
            await asyncio.to_thread(self._spool.add, [p.entry for p in batch])
        except (OSError, sqlite3.Error) as exc:
            self._buf.requeue(batch)
            self._spool_failing = True
            self.spool_errors += 1
            self._spool_log.warn("spool", "ledger postgres: cannot spool %d records to %s: %s",
                                 len(batch), self._spool.path, exc, level=logging.ERROR)
            return False
        self._spool_failing = False
        if not self.records_spooled or self._spooled == 0:
            log.warning("ledger postgres: the database is down; spooling records to %s",
                        self._spool.path)
        self._spooled += len(batch)
        self.records_spooled += len(batch)
        settle(batch, True)
        return True

    async def _replay(self) -> bool:
        """Write the spooled records (oldest first, before any newer one); True when the spool
        is empty. A record the database already has (same decision id and receipt) is skipped."""
        if self._spool is None or self._spooled == 0:
            return True
        while True:
            try:
                rows = await asyncio.to_thread(self._spool.oldest, self.batch_size)
            except (OSError, sqlite3.Error) as exc:
                self._spool_error("read", exc)
                return False
            if not rows:
                self._spooled = 0
                if self._resumed is not None and self._down_since is None:
                    self._note_resumed(0)  # its last pass refused all it took: log it now
                return True
            bad = [(i, e, why) for i, e in rows if (why := refusal(e)) is not None]
            if bad:
                try:
                    await asyncio.to_thread(self._spool.refuse, [(i, w) for i, _, w in bad])
                except (OSError, sqlite3.Error) as exc:
                    self._spool_error("refuse a record of", exc)
                    return False
                for _, e, why in bad:
                    log.debug("ledger postgres: spooled record of decision %s refused: %s",
                              e.decision_id, why)
                _, e0, why0 = bad[0]  # one ERROR per pass (a damaged spool has many)
                log.error("ledger postgres: %d spooled records refused, not written (first: "
                          "decision %s: %s); kept in the table 'refused' of %s", len(bad),
                          e0.decision_id, why0, self._spool.path)
                self.spool_refused += len(bad)
                self._spooled = max(0, self._spooled - len(bad))
                gone = {i for i, _, _ in bad}
                rows = [(i, e) for i, e in rows if i not in gone]
                if not rows:
                    continue
            batch = [Pending(e, None, None) for _, e in rows]
            self._inflight_since = time.monotonic()
            try:
                if self._writer is None or self._writer.closed:
                    self._writer = await psycopg.AsyncConnection.connect(self.dsn, **_TCP)
                cps, head, written = await self._commit(self._writer, batch, False,
                                                        dedupe=True)
            except (psycopg.Error, OSError) as exc:
                self._write_failed(exc)
                with contextlib.suppress(Exception):
                    if self._writer is not None and self._writer.broken:
                        await self._writer.close()
                return False
            finally:
                self._inflight_since = None
            try:  # before the accounting: an outage's resumption is logged once the spool
                await asyncio.to_thread(self._spool.remove, [i for i, _ in rows])  # is empty
                removed = True
            except (OSError, sqlite3.Error) as exc:  # written: the next pass skips them
                self._spool_error("empty", exc)
                removed = False
            if removed:
                self._spooled = max(0, self._spooled - len(rows))
            # counted as written: the records this commit added (not those a crashed replay
            # had already written, which the dedupe skipped)
            self._committed(batch, cps, head[0], written)
            if not removed:
                return False
            if self._spooled == 0 or len(rows) < self.batch_size:
                log.warning("ledger postgres: spooled records written to the database; %d "
                            "left in %s", self._spooled, self._spool.path)

    def _spool_error(self, what: str, exc: BaseException) -> None:
        self.spool_errors += 1
        self._spool_log.warn("spool", "ledger postgres: cannot %s the spool %s (%s); %d "
                             "records wait in it, retrying every %.1fs", what,
                             self._spool.path if self._spool else None, exc, self._spooled,
                             self.retry_interval_s, level=logging.ERROR)

    async def _write(self, batch: list[Any], sign_last: bool) -> bool:
        self._inflight_since = time.monotonic()
        try:
            if self._writer is None or self._writer.closed:
                self._writer = await psycopg.AsyncConnection.connect(self.dsn, **_TCP)
            cps, head, _ = await self._commit(self._writer, batch, sign_last)
        except (psycopg.Error, OSError) as exc:
            self._buf.requeue(batch)
            self._write_failed(exc)
            with contextlib.suppress(Exception):
                if self._writer is not None and self._writer.broken:
                    await self._writer.close()
            return False
        except BaseException:
            self._buf.requeue(batch)
            raise
        finally:
            self._inflight_since = None
        self._committed(batch, cps, head[0])
        return True

    async def _commit(
        self, conn: psycopg.AsyncConnection[Any], batch: list[Any], sign_last: bool,
        dedupe: bool = False,
    ) -> tuple[list[Checkpoint], tuple[int, str], int]:
        """Append ``batch`` to the shard in one transaction; the checkpoints signed, the new
        head and how many records were written (fewer than the batch when ``dedupe`` skipped
        some)."""
        t = self.t
        async with conn.transaction(), conn.cursor() as cur:
            await cur.execute(
                f"INSERT INTO {t.heads} (shard, seq, chain_hash) VALUES (%s, 0, %s) "
                "ON CONFLICT (shard) DO NOTHING", (self.shard, GENESIS))
            await cur.execute(
                f"SELECT seq, chain_hash FROM {t.heads} WHERE shard = %s FOR UPDATE",
                (self.shard,))
            row = await cur.fetchone()
            assert row is not None
            entries = [p.entry for p in batch]
            if dedupe and entries:  # a replayed spool: skip what a crashed replay wrote
                await cur.execute(
                    f"SELECT decision_id, receipt FROM {t.decisions} WHERE decision_id = "
                    "ANY(%s)", (list({e.decision_id for e in entries}),))
                have = {(r[0], r[1]) for r in await cur.fetchall()}
                entries = [e for e in entries if (e.decision_id, e.receipt) not in have]
            linked, cps, head = link(
                entries, self.shard, (int(row[0]), str(row[1])), self.signer,
                self.checkpoint_every, sign_last, time.time(),
            )
            if linked:
                async with cur.copy(f"COPY {t.decisions} ({_COPY_COLS}) FROM STDIN") as copy:
                    for x in linked:
                        await copy.write_row(_row(x))
                await cur.execute(
                    f"UPDATE {t.heads} SET seq = %s, chain_hash = %s WHERE shard = %s",
                    (head[0], head[1], self.shard))
            if cps:
                await cur.executemany(*checkpoint_insert(t, cps))
        return cps, head, len(linked)

    def _write_failed(self, exc: BaseException) -> None:
        self.write_errors += 1
        self._note_failure()
        now = time.monotonic()
        if now - self._last_warning >= 60.0:
            self._last_warning = now
            log.warning("ledger postgres: write failed (%s); %d records pending, %d dropped so "
                        "far; retrying every %.1fs", first_line(exc), len(self._buf), self.dropped,
                        self.retry_interval_s)

    # -- reads ----------------------------------------------------------------------------
    async def _fetch(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        assert self._read_lock is not None
        async with self._read_lock:
            if self._reader is None or self._reader.closed:
                self._reader = await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, connect_timeout=5)
            async with self._reader.cursor() as cur:
                await cur.execute(sql, args)
                return list(await cur.fetchall())

    async def lookup(self, decision_id: str) -> dict[str, Any] | None:
        """The last record of ``decision_id`` (earlier ones under ``"attempts"``): committed
        ones from the database, then any still pending here."""
        rows = await self._fetch(
            f"SELECT record FROM {self.t.decisions} WHERE decision_id = %s ORDER BY id",
            (decision_id,))
        texts = [r[0] for r in rows]
        if self._spool is not None and self._spooled:
            try:
                texts += await asyncio.to_thread(self._spool.texts, decision_id)
            except (OSError, sqlite3.Error) as exc:
                self._spool_error("read", exc)
        with self._buf.lock:
            texts += [p.entry.text for p in self._buf.items if p.entry.decision_id == decision_id]
        return merge_records(texts)

    async def query(self, q: Query) -> Page:
        sql, args = select_sql(self.t, q, limit=q.limit + 1)
        rows = await self._fetch(sql, args)
        return page_of([_export_row(r) for r in rows], q.limit)


def _row(x: Linked) -> tuple[Any, ...]:
    e = x.entry
    return (e.decision_id, e.at_unix, e.tenant, e.endpoint, e.workload_class, e.model,
            e.substrate, e.status, e.ttft_s, e.cost_usd, x.shard, x.seq, e.receipt, x.prev_hash,
            x.chain_hash, e.text)


async def migrate(conn: psycopg.AsyncConnection[Any], t: Tables,
                  to: int = WRITER_VERSION) -> int:
    """Bring the tables to version ``to`` at least (under an advisory lock; a writer's start:
    `WRITER_VERSION`, a prune: `SCHEMA_VERSION`); return the version they are at."""
    return await pgschema.migrate(conn, t, t.migrations()[:to], reads=SCHEMA_VERSION)


# -- readers (verify, export, the list route) ---------------------------------------------------
def select_sql(t: Tables, q: Query | None, limit: int | None = None) -> tuple[str, list[Any]]:
    where, args = where_clause(q, "%s", "id")
    sql = f"SELECT {_EXPORT_COLS} FROM {t.decisions}{where}"
    sql += " ORDER BY id"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return sql, args


_NDJSON_LINE = (
    "format('{\"schema\":\"" + EXPORT_SCHEMA + "\",\"shard\":%s,\"seq\":%s,\"receipt\":"
    "\"%s\",\"prev_hash\":\"%s\",\"chain_hash\":\"%s\",\"record\":%s}', to_json(shard), "
    "chain_seq, receipt, prev_hash, chain_hash, record)"
)
"""One NDJSON line, built in one ``format()`` (a chain of ``||`` copies the record each time:
measured 1.45x slower)."""
_CSV_COLS = (
    "shard, chain_seq AS seq, decision_id, at_unix, tenant, workload_class, model, substrate, "
    "endpoint, status, cost_usd, receipt, prev_hash, chain_hash, record"
)


def copy_sql(conn: psycopg.Connection[Any], t: Tables, q: Query | None, fmt: str) -> str:
    """The ``COPY … TO STDOUT`` statement of an export (COPY takes no bind parameters: the
    filter values are quoted by psycopg)."""
    from psycopg import sql as pgsql

    select, args = select_sql(t, q)
    parts = select.split("%s")
    assert len(parts) == len(args) + 1
    select = parts[0] + "".join(
        pgsql.Literal(a).as_string(conn) + rest for a, rest in zip(args, parts[1:], strict=True)
    )
    if fmt == "ndjson":
        select = select.replace(f"SELECT {_EXPORT_COLS}", f"SELECT {_NDJSON_LINE}", 1)
        return f"COPY ({select}) TO STDOUT"
    select = select.replace(f"SELECT {_EXPORT_COLS}", f"SELECT {_CSV_COLS}", 1)
    return f"COPY ({select}) TO STDOUT (FORMAT csv, HEADER)"


def copy_ndjson(conn: psycopg.Connection[Any], t: Tables, q: Query | None,
                out: IO[bytes], anchors: Sequence[PruneAnchor] = ()) -> int:
    """NDJSON built by PostgreSQL (the same bytes as `query.write_ndjson`), streamed with
    COPY. Text-format COPY escapes only backslashes here (canonical JSON has no raw tab, CR or
    newline), so undoing it is one replace per group of whole lines, when there is one."""
    out.write(anchor_lines(anchors))
    n = 0
    carry = b""
    with conn.cursor() as cur, cur.copy(copy_sql(conn, t, q, "ndjson")) as cp:
        for group in _groups(cp):
            data = carry + group if carry else group
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            if cut < len(data):
                data = data[:cut]
            n += data.count(b"\n")
            out.write(data.replace(b"\\\\", b"\\") if b"\\" in data else data)
    if carry:
        raise RuntimeError("COPY ended inside a line")
    return n


def _groups(cp: Any, rows: int = 2048) -> Iterator[bytes]:
    """The COPY's data (one row a block) joined ``rows`` blocks at a time."""
    buf: list[Any] = []
    for block in cp:
        buf.append(block)
        if len(buf) >= rows:
            yield b"".join(buf)
            buf.clear()
    if buf:
        yield b"".join(buf)


class _CopyReader(io.RawIOBase):
    """A readable stream over a COPY's blocks (for pyarrow's CSV reader)."""

    def __init__(self, blocks: Iterator[Any]) -> None:
        self._blocks = blocks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = bytes(next(self._blocks))
            except StopIteration:
                return 0
        k = min(len(b), len(self._buf))
        b[:k] = self._buf[:k]
        self._buf = self._buf[k:]
        return k


def copy_csv(conn: psycopg.Connection[Any], t: Tables, q: Query | None, out: IO[bytes],
             anchors: Sequence[PruneAnchor] = ()) -> int:
    """CSV (header, RFC 4180 quoting) written by PostgreSQL, streamed with COPY (no
    ``anchors``: as `query.write_csv`)."""
    n = -1  # the header line
    with conn.cursor() as cur, cur.copy(copy_sql(conn, t, q, "csv")) as cp:
        for data in _groups(cp):
            n += data.count(b"\n")  # records hold no raw newline: canonical JSON escapes them
            out.write(data)
    return max(n, 0)


def copy_parquet(conn: psycopg.Connection[Any], t: Tables, q: Query | None,
                 out: IO[bytes], anchors: Sequence[PruneAnchor] = ()) -> int:
    """Parquet from PostgreSQL's CSV, parsed by pyarrow's (multi-threaded) CSV reader."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    schema = parquet_schema(anchors)
    n = 0
    with conn.cursor() as cur, cur.copy(copy_sql(conn, t, q, "csv")) as cp:
        reader = pacsv.open_csv(
            io.BufferedReader(_CopyReader(_groups(cp)), buffer_size=1 << 20),
            read_options=pacsv.ReadOptions(block_size=16 << 20),
            convert_options=pacsv.ConvertOptions(
                column_types={f.name: f.type for f in schema}, strings_can_be_null=True,
                quoted_strings_can_be_null=False),
        )
        with pq.ParquetWriter(out, schema, compression="zstd") as writer:
            for batch in reader:
                table = pa.Table.from_batches([batch]).cast(schema)
                writer.write_table(table)
                n += batch.num_rows
    return n


COPY_WRITERS = {"ndjson": copy_ndjson, "csv": copy_csv, "parquet": copy_parquet}


def _export_row(r: Sequence[Any]) -> ExportRow:
    return ExportRow(
        row_id=r[0], shard=r[1], seq=r[2], decision_id=r[3], at_unix=r[4], tenant=r[5],
        workload_class=r[6], model=r[7], substrate=r[8], endpoint=r[9], status=r[10],
        cost_usd=r[11], receipt=r[12], prev_hash=r[13], chain_hash=r[14], text=r[15],
        ttft_s=r[16],
    )


def connect_sync(dsn: str) -> psycopg.Connection[Any]:
    """A reader's connection: one read-only, repeatable-read transaction sees one consistent
    ledger however long an export or a verify takes."""
    conn = psycopg.connect(dsn, autocommit=False, connect_timeout=5)
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    return conn


def check_tables(conn: psycopg.Connection[Any], t: Tables) -> None:
    """Raise `LookupError` when the ledger tables are missing or of another version."""
    row = conn.execute("SELECT to_regclass(%s)", (t.version,)).fetchone()
    if row is None or row[0] is None:
        raise LookupError(f"no ledger tables {t.decisions} in this database")
    got = conn.execute(f"SELECT version FROM {t.version}").fetchone()
    if got is None or int(got[0]) not in READABLE_VERSIONS:
        raise LookupError(f"ledger schema version {got and got[0]}; this inferplane reads "
                          f"{' and '.join(map(str, READABLE_VERSIONS))}")


def iter_rows(
    conn: psycopg.Connection[Any], t: Tables, q: Query | None = None, *, itersize: int = 20_000,
    order: str = "id",
) -> Iterator[ExportRow]:
    """Records streamed through a server-side cursor (inside the caller's transaction)."""
    sql, args = select_sql(t, q)
    if order != "id":
        sql = sql.replace(" ORDER BY id", f" ORDER BY {order}")
    with conn.cursor(name="inferplane_export") as cur:
        cur.itersize = itersize
        cur.execute(sql, args)
        for r in cur:
            yield _export_row(r)


def checkpoint_insert(
    t: Tables, cps: Sequence[Checkpoint]
) -> tuple[str, list[tuple[str, int, str, float, str, str]]]:
    """The statement and rows that add ``cps`` (the writer, and `inferplane ledger-sign-heads`)."""
    return (f"INSERT INTO {t.checkpoints} (shard, seq, chain_hash, at_unix, key_id, signature) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            [(c.shard, c.seq, c.chain_hash, c.at_unix, c.key_id, c.signature) for c in cps])


def read_checkpoints(conn: psycopg.Connection[Any], t: Tables) -> list[Checkpoint]:
    return [Checkpoint(s, int(q), h, float(a), k, g) for s, q, h, a, k, g in conn.execute(
        f"SELECT shard, seq, chain_hash, at_unix, key_id, signature FROM {t.checkpoints} "
        "ORDER BY id")]


def read_anchors(conn: psycopg.Connection[Any], t: Tables) -> list[PruneAnchor]:
    """Every prune anchor, oldest first (none before migration 3)."""
    row = conn.execute("SELECT to_regclass(%s)", (t.anchors,)).fetchone()
    if row is None or row[0] is None:
        return []
    return [PruneAnchor(s, int(f), p, float(b), float(a), k, g)
            for s, f, p, b, a, k, g in conn.execute(
                "SELECT shard, first_seq, prev_hash, before_unix, at_unix, key_id, signature "
                f"FROM {t.anchors} ORDER BY id")]


def read_heads(conn: psycopg.Connection[Any], t: Tables) -> dict[str, tuple[int, str]]:
    return {s: (int(q), h) for s, q, h in conn.execute(
        f"SELECT shard, seq, chain_hash FROM {t.heads}")}
