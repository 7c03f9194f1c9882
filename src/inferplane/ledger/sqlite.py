"""A SQLite decision ledger: hash-chained records, group commit off the request path.

``record()`` runs on the asyncio request path: it encodes the record in canonical form (its
receipt is the hash of those bytes), appends it to a pending buffer under a lock never held across
disk I/O, and wakes the writer thread. The writer commits whatever is pending (at most
``batch_size`` rows a transaction: ``BEGIN IMMEDIATE``, WAL, ``synchronous=NORMAL``, which
survives a killed process), chaining each record onto its shard's head (read inside the
transaction, so several processes can share one file and one chain), and signs a checkpoint every
``checkpoint_every`` records and every ``checkpoint_interval_s``. While one commit runs the next
records gather, so a busy gateway commits in groups (group commit). ``await receipt.durable()``
returns once the record's transaction committed: the gateway sends an answer only after that.

Guarantees:

- never a half-written record or chain: a batch, its head and its checkpoints commit together;
- a failed write (read-only file, full disk) never raises into the request path: the batch goes
  back to the front of the buffer, the writer retries after a back-off, a warning is logged at
  most once a minute, and beyond ``max_pending`` rows the oldest are dropped and counted;
- ``get()`` sees a record from the moment ``record()`` returns (database and buffer are read
  under the writer's lock, so a row is never missed or seen twice while it moves).

One decision id may be recorded more than once (failed attempts, then the final outcome): every
record is its own row; ``get()`` returns the last one with the earlier ones, oldest first, under
``"attempts"``. Schema version 2 adds the chain; a version-1 file is migrated (its rows chained
as they stand) when a gateway opens it for writing. Version 3 adds the ``prune_anchors`` table:
the first prune (`inferplane.ledger.prune`) migrates a file to it; gateways create version 2 (so
that an older inferplane still opens a file never pruned) and read and write both.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from inferplane.config.files import writable_file_problem
from inferplane.errors import ConfigError
from inferplane.ledger.chain import GENESIS, Checkpoint, PruneAnchor, Signer, chain_hash
from inferplane.ledger.query import ExportRow, Page, Query, page_of, where_clause
from inferplane.ledger.record import Outcome, Receipt
from inferplane.ledger.writer import CommitAccounting, Linked, Pending, PendingBuffer, link
from inferplane.placement.framework import Decision
from inferplane.sqliteio import immediate

log = logging.getLogger("inferplane.ledger")

SCHEMA_VERSION = 3
"""The newest version this code reads and writes (3: the prune anchors' table)."""
WRITER_VERSION = 2
"""What a gateway creates (and migrates a version-1 file to); the first prune makes it 3."""
READABLE_VERSIONS = (2, 3)
"""What readers and writers use as they stand (a version-2 file was never pruned)."""

CONFIG_FIELD = "gateway.ledger_path"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS decisions (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    decision_id    TEXT    NOT NULL,
    at_unix        REAL    NOT NULL,
    tenant         TEXT    NOT NULL,
    endpoint       TEXT,
    workload_class TEXT,
    status         INTEGER,
    ttft_s         REAL,
    cost_usd       REAL,
    record         TEXT    NOT NULL,
    model          TEXT,
    substrate      TEXT,
    shard          TEXT,
    chain_seq      INTEGER,
    receipt        TEXT,
    prev_hash      TEXT,
    chain_hash     TEXT
);
CREATE INDEX IF NOT EXISTS decisions_by_id ON decisions (decision_id);
CREATE INDEX IF NOT EXISTS decisions_by_tenant_time ON decisions (tenant, at_unix);
"""

_V2 = """
CREATE UNIQUE INDEX IF NOT EXISTS decisions_by_chain ON decisions (shard, chain_seq);
CREATE TABLE IF NOT EXISTS heads (
    shard      TEXT PRIMARY KEY,
    seq        INTEGER NOT NULL,
    chain_hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    shard      TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    chain_hash TEXT NOT NULL,
    at_unix    REAL NOT NULL,
    key_id     TEXT NOT NULL,
    signature  TEXT NOT NULL
);
"""

_V3 = """
CREATE TABLE IF NOT EXISTS prune_anchors (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    shard       TEXT NOT NULL,
    first_seq   INTEGER NOT NULL,
    prev_hash   TEXT NOT NULL,
    before_unix REAL NOT NULL,
    at_unix     REAL NOT NULL,
    key_id      TEXT NOT NULL,
    signature   TEXT NOT NULL
);
"""

_V1_TO_V2_COLUMNS = ("model", "substrate", "shard", "chain_seq", "receipt", "prev_hash",
                     "chain_hash")

_INSERT = (
    "INSERT INTO decisions (decision_id, at_unix, tenant, endpoint, workload_class, status, "
    "ttft_s, cost_usd, record, model, substrate, shard, chain_seq, receipt, prev_hash, "
    "chain_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT = "SELECT record FROM decisions WHERE decision_id = ? ORDER BY seq"
_EXPORT_COLS = (
    "seq, shard, chain_seq, decision_id, at_unix, tenant, workload_class, model, substrate, "
    "endpoint, status, cost_usd, receipt, prev_hash, chain_hash, record, ttft_s"
)

Row = tuple[Any, ...]
"""One table row, in ``_INSERT`` column order."""


class LedgerFileError(Exception):
    """The file is not a ledger this version can read (not SQLite, or a newer schema)."""


class SqliteLedger(CommitAccounting):
    """Decision records in one SQLite file (see the module docstring).

    ``path`` must name a file in an existing, writable directory; otherwise the constructor raises
    `ConfigError` naming ``gateway.ledger_path`` in ``source`` (the fleet file). Counters for
    operators and tests: ``batches_written``, ``records_written``, ``write_errors``, ``dropped``,
    ``checkpoints_written``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int = 256,
        flush_interval_s: float = 0.2,
        max_pending: int = 100_000,
        retry_interval_s: float = 1.0,
        source: str = "<config>",
        shard: str = "main",
        signer: Signer | None = None,
        checkpoint_every: int = 1000,
        checkpoint_interval_s: float = 60.0,
        group_commit: bool = True,
    ) -> None:
        if batch_size <= 0 or flush_interval_s <= 0 or max_pending < batch_size:
            raise ValueError("need batch_size > 0, flush_interval_s > 0, max_pending >= batch_size")
        self.path = Path(path)
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self.shard = shard
        self.signer = signer
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval_s = checkpoint_interval_s
        self.group_commit = group_commit
        self.batches_written = 0
        self.records_written = 0
        self.checkpoints_written = 0
        self.write_errors = 0
        self._buf = PendingBuffer(max_pending, str(self.path))
        self._db_lock = threading.Lock()  # the connection, and rows moving buffer → file
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_warning = float("-inf")
        self.log_name = f"ledger {self.path}"
        self._last_checkpoint = time.monotonic()
        self._unsigned = False
        self._conn = open_for_writing(self.path, source)

    @property
    def max_pending(self) -> int:
        return self._buf.max_pending

    @property
    def dropped(self) -> int:
        return self._buf.dropped

    # -- the request path -----------------------------------------------------------------
    def record(self, decision: Decision, outcome: Outcome, at_unix: float) -> Receipt:
        """Encode and queue one record; never raises for a disk problem."""
        receipt, n = self._buf.record(decision, outcome, at_unix)
        if (self.group_commit or n >= self.batch_size) and not self._wake.is_set():
            self._wake.set()
        return receipt

    @property
    def pending(self) -> int:
        """Records recorded but not yet committed."""
        return len(self._buf)

    # -- reads ----------------------------------------------------------------------------
    def get(self, decision_id: str) -> dict[str, Any] | None:
        """The last record of ``decision_id`` (earlier ones under ``"attempts"``), or None."""
        with self._db_lock:
            texts = [r[0] for r in self._conn.execute(_SELECT, (decision_id,))]
            with self._buf.lock:
                texts += [p.entry.text for p in self._buf.items
                          if p.entry.decision_id == decision_id]
        return merge_records(texts)

    async def lookup(self, decision_id: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.get, decision_id)

    def query_sync(self, q: Query) -> Page:
        """One page of committed records (the buffer is flushed within milliseconds)."""
        with self._db_lock:
            rows = list(iter_rows(self._conn, q, limit=q.limit + 1))
        return page_of(rows, q.limit)

    async def query(self, q: Query) -> Page:
        return await asyncio.to_thread(self.query_sync, q)

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the writer thread (idempotent)."""
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(
                target=self._run, name=f"ledger-writer:{self.path.name}", daemon=True
            )
            self._thread.start()

    async def close(self) -> None:
        """Stop the writer, write everything pending, close the file (idempotent)."""
        await asyncio.to_thread(self.close_sync)

    def close_sync(self) -> None:
        """`close` for synchronous callers; the last batch is checkpointed."""
        if self._stop.is_set() and self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if not self.flush(sign_last=True):
            lost = self._buf.clear()
            log.error("ledger %s: closing with %d unwritten records (dropped)", self.path, lost)
        elif self._unsigned and self.signer is not None:
            self._write_batch([], sign_last=True)
        with self._db_lock:
            self._conn.close()

    def flush(self, *, full_batches_only: bool = False, sign_last: bool = False) -> bool:
        """Write pending rows now, one transaction per batch of at most ``batch_size``; with
        ``full_batches_only`` leave a last partial batch for later. False when a write failed
        (its rows stay pending)."""
        floor = self.batch_size if full_batches_only else 1
        while len(self._buf) >= floor:
            last = len(self._buf) <= self.batch_size
            if not self._write_one_batch(sign_last=sign_last and last):
                return False
        return True

    # -- the writer -----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            # Group commit: woken by a record, write everything pending (those that arrive
            # during a commit go in the next). Without it, write full batches when woken and
            # everything on the interval.
            woken = self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            due = time.monotonic() - self._last_checkpoint >= self.checkpoint_interval_s
            ok = self.flush(full_batches_only=woken and not self.group_commit, sign_last=due)
            if ok and due and self._unsigned and self.signer is not None:
                ok = self._write_batch([], sign_last=True)
            if not ok:
                self._stop.wait(self.retry_interval_s)
        # close_sync() writes what is left, in its own thread, after join().

    def _write_one_batch(self, sign_last: bool = False) -> bool:
        with self._db_lock:
            batch = self._buf.take(self.batch_size)
            if not batch:
                return True
            return self._write_locked(batch, sign_last)

    def _write_batch(self, batch: list[Pending], sign_last: bool) -> bool:
        with self._db_lock:
            return self._write_locked(batch, sign_last)

    def _write_locked(self, batch: list[Pending], sign_last: bool) -> bool:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                head = _head(self._conn, self.shard)
                linked, cps, new_head = link(
                    [p.entry for p in batch], self.shard, head, self.signer,
                    self.checkpoint_every, sign_last, time.time(),
                )
                self._insert_rows(self._conn, [_row(x) for x in linked])
                _write_chain_state(self._conn, self.shard, new_head, cps)
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        except BaseException as exc:  # the request path must never see a disk problem
            self._buf.requeue(batch)
            if not isinstance(exc, Exception):
                raise
            self._write_failed(exc)
            return False
        self._committed(batch, cps, new_head[0])
        return True

    def _insert_rows(self, conn: sqlite3.Connection, rows: Sequence[Row]) -> None:
        """Insert one batch inside the open transaction (a seam for fault-injection tests)."""
        conn.executemany(_INSERT, rows)

    def _write_failed(self, exc: Exception) -> None:
        self.write_errors += 1
        self._note_failure()
        now = time.monotonic()
        if now - self._last_warning >= 60.0:
            self._last_warning = now
            log.warning(
                "ledger %s: write failed (%s); %d records pending, %d dropped so far; "
                "retrying every %.1fs",
                self.path,
                exc,
                len(self._buf),
                self.dropped,
                self.retry_interval_s,
            )


def _row(x: Linked) -> Row:
    e = x.entry
    return (
        e.decision_id, e.at_unix, e.tenant, e.endpoint, e.workload_class, e.status, e.ttft_s,
        e.cost_usd, e.text, e.model, e.substrate, x.shard, x.seq, e.receipt, x.prev_hash,
        x.chain_hash,
    )


def _head(conn: sqlite3.Connection, shard: str) -> tuple[int, str]:
    row = conn.execute("SELECT seq, chain_hash FROM heads WHERE shard = ?", (shard,)).fetchone()
    return (0, GENESIS) if row is None else (int(row[0]), str(row[1]))


def _write_chain_state(
    conn: sqlite3.Connection, shard: str, head: tuple[int, str], cps: Sequence[Checkpoint]
) -> None:
    conn.execute(
        "INSERT INTO heads (shard, seq, chain_hash) VALUES (?, ?, ?) ON CONFLICT (shard) "
        "DO UPDATE SET seq = excluded.seq, chain_hash = excluded.chain_hash",
        (shard, head[0], head[1]),
    )
    write_checkpoints(conn, cps)


def write_checkpoints(conn: sqlite3.Connection, cps: Sequence[Checkpoint]) -> None:
    """Add ``cps`` (the writer, and `inferplane ledger-sign-heads`), in the caller's transaction."""
    conn.executemany(
        "INSERT INTO checkpoints (shard, seq, chain_hash, at_unix, key_id, signature) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [(c.shard, c.seq, c.chain_hash, c.at_unix, c.key_id, c.signature) for c in cps],
    )


def merge_records(texts: Iterable[str | bytes]) -> dict[str, Any] | None:
    """The last of one decision id's records, oldest first, with the others under
    ``"attempts"`` (always present; empty when the id was recorded once)."""
    records: list[dict[str, Any]] = [orjson.loads(t) for t in texts]
    if not records:
        return None
    last = records[-1]
    last["attempts"] = records[:-1]
    return last


# -- readers (explain, verify, export, the list route) ------------------------------------------
def open_readonly(path: str | Path) -> sqlite3.Connection:
    """Open a ledger file read-only. Raises `FileNotFoundError` for a missing file and
    `LedgerFileError` for a file that is not a ledger of a version this code reads."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such ledger file")
    try:
        conn = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise LedgerFileError(f"{p}: cannot open: {exc}") from None
    try:
        _check_version(conn, p, create=False)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise LedgerFileError(f"{p}: not a readable ledger: {exc}") from None
    except BaseException:
        conn.close()
        raise
    return conn


def read_decision(path: str | Path, decision_id: str) -> dict[str, Any] | None:
    """Read one decision from a ledger file without writing to it (for ``inferplane explain``).
    Rows a running gateway has not committed yet are not seen."""
    conn = open_readonly(path)
    try:
        return merge_records(r[0] for r in conn.execute(_SELECT, (decision_id,)))
    except sqlite3.DatabaseError as exc:
        raise LedgerFileError(f"{path}: not a readable ledger: {exc}") from None
    finally:
        conn.close()


def _export_row(r: Sequence[Any]) -> ExportRow:
    return ExportRow(
        row_id=r[0], shard=r[1] or "", seq=r[2] if r[2] is not None else -1,
        decision_id=r[3], at_unix=r[4], tenant=r[5], workload_class=r[6], model=r[7],
        substrate=r[8], endpoint=r[9], status=r[10], cost_usd=r[11], receipt=r[12] or "",
        prev_hash=r[13] or "", chain_hash=r[14] or "", text=r[15],
        ttft_s=r[16],
    )


def iter_rows(
    conn: sqlite3.Connection, q: Query | None = None, *, limit: int | None = None
) -> Iterator[ExportRow]:
    """Records in storage order, filtered by ``q`` (every record when None)."""
    where, args = where_clause(q, "?", "seq")
    sql = f"SELECT {_EXPORT_COLS} FROM decisions{where}"
    sql += " ORDER BY seq"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    for r in conn.execute(sql, args):
        yield _export_row(r)


def iter_chain(conn: sqlite3.Connection) -> Iterator[ExportRow]:
    """Every record, shard by shard in chain order (for verify)."""
    sql = f"SELECT {_EXPORT_COLS} FROM decisions ORDER BY shard, chain_seq, seq"
    for r in conn.execute(sql):
        yield _export_row(r)


def read_checkpoints(conn: sqlite3.Connection) -> list[Checkpoint]:
    return [
        Checkpoint(str(s), int(q), str(h), float(a), str(k), str(g))
        for s, q, h, a, k, g in conn.execute(
            "SELECT shard, seq, chain_hash, at_unix, key_id, signature FROM checkpoints "
            "ORDER BY id"
        )
    ]


def read_heads(conn: sqlite3.Connection) -> dict[str, tuple[int, str]]:
    return {str(s): (int(q), str(h)) for s, q, h in conn.execute(
        "SELECT shard, seq, chain_hash FROM heads")}


def read_anchors(conn: sqlite3.Connection) -> list[PruneAnchor]:
    """Every prune anchor, oldest first (none in a version-2 file)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = "
                    "'prune_anchors'").fetchone() is None:
        return []
    return [PruneAnchor(str(s), int(f), str(p), float(b), float(a), str(k), str(g))
            for s, f, p, b, a, k, g in conn.execute(
                "SELECT shard, first_seq, prev_hash, before_unix, at_unix, key_id, signature "
                "FROM prune_anchors ORDER BY id")]


# -- opening, versions, migration ---------------------------------------------------------------
def open_for_writing(path: str | Path, source: str) -> sqlite3.Connection:
    """An autocommit connection to a ledger file (a gateway's writer, `inferplane ledger-prune`):
    a new file is created at `WRITER_VERSION` and a version-1 file migrated to it, a file at a
    `READABLE_VERSIONS` version is opened as it stands. Raises `ConfigError` naming the field."""
    path = Path(path)

    def bad(msg: str) -> ConfigError:
        return ConfigError(source, [(CONFIG_FIELD, f"{path}: {msg}")])

    problem = writable_file_problem(path)  # what `inferplane check` reports too
    if problem is not None:
        raise bad(problem)
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise bad(f"cannot open: {exc}") from None
    try:
        conn.execute("PRAGMA busy_timeout=5000")  # several processes may share the file
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            log.warning("ledger %s: WAL not available here (journal_mode=%s)", path, mode)
        conn.execute("PRAGMA synchronous=NORMAL")
        _check_version(conn, path, create=True)
    except LedgerFileError as exc:
        conn.close()
        raise bad(str(exc).removeprefix(f"{path}: ")) from None
    except sqlite3.Error as exc:
        conn.close()
        raise bad(f"cannot use as a ledger: {exc}") from None
    return conn


def _check_version(conn: sqlite3.Connection, path: Path, *, create: bool) -> None:
    """Check (and with ``create``, initialise or migrate) the schema of an open ledger."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "schema_version" not in tables:
        if tables - {"sqlite_sequence"}:
            raise LedgerFileError(
                f"{path}: a SQLite file but not an inferplane ledger "
                f"(tables: {', '.join(sorted(tables))})"
            )
        if not create:
            raise LedgerFileError(f"{path}: an empty database, not an inferplane ledger")
        try:  # one transaction: a file is either an empty database or a whole ledger
            conn.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA} {_V2} INSERT INTO schema_version (version) SELECT "
                f"{WRITER_VERSION} WHERE NOT EXISTS (SELECT 1 FROM schema_version); COMMIT;"
            )
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return
    rows = [r[0] for r in conn.execute("SELECT version FROM schema_version")]
    if len(rows) != 1 or not isinstance(rows[0], int):
        raise LedgerFileError(f"{path}: a damaged schema_version table ({rows!r})")
    if rows[0] == 1 and create:
        _migrate_1_to_2(conn)
        return
    if rows[0] not in READABLE_VERSIONS:
        if rows[0] < SCHEMA_VERSION:
            raise LedgerFileError(
                f"{path}: ledger schema version {rows[0]}; open it once with a gateway "
                f"to migrate it to version {WRITER_VERSION}"
            )
        raise LedgerFileError(
            f"{path}: ledger schema version {rows[0]} is a newer version; this inferplane "
            f"reads version {SCHEMA_VERSION} (use a newer inferplane or another file)"
        )


def _migrate_1_to_2(conn: sqlite3.Connection, shard: str = "main") -> None:
    """Add the chain columns and tables, and chain the existing rows as they stand (their
    receipts are the hashes of their stored text), in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("SELECT version FROM schema_version").fetchone()[0] != 1:
            conn.execute("ROLLBACK")  # another process migrated it meanwhile
            return
        for col in _V1_TO_V2_COLUMNS:
            kind = "INTEGER" if col == "chain_seq" else "TEXT"
            conn.execute(f"ALTER TABLE decisions ADD COLUMN {col} {kind}")
        for stmt in _V2.strip().split(";"):
            if stmt.strip():
                conn.execute(stmt)
        seq, prev = 0, GENESIS
        rows = conn.execute("SELECT seq, record FROM decisions ORDER BY seq").fetchall()
        for row_id, text in rows:
            seq += 1
            receipt = hashlib.sha256(str(text).encode()).hexdigest()
            h = chain_hash(shard, seq, prev, receipt)
            try:
                rec = orjson.loads(text)
            except orjson.JSONDecodeError:
                rec = {}
            model = (rec.get("request") or {}).get("model")
            substrate = (rec.get("picked") or {}).get("substrate")
            conn.execute(
                "UPDATE decisions SET model = ?, substrate = ?, shard = ?, chain_seq = ?, "
                "receipt = ?, prev_hash = ?, chain_hash = ? WHERE seq = ?",
                (model, substrate, shard, seq, receipt, prev, h, row_id),
            )
            prev = h
        if seq:
            _write_chain_state(conn, shard, (seq, prev), [])
        conn.execute("UPDATE schema_version SET version = 2")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    log.info("ledger: migrated schema 1 → 2 (%d records chained)", seq)


def migrate_2_to_3(conn: sqlite3.Connection) -> None:
    """Add the ``prune_anchors`` table (additive: nothing else changes), in one transaction;
    nothing when the file is at version 3 already (`inferplane ledger-prune`)."""
    with immediate(conn):
        if conn.execute("SELECT version FROM schema_version").fetchone()[0] != 2:
            return  # another process migrated it meanwhile: an empty transaction
        conn.execute(_V3)
        conn.execute("UPDATE schema_version SET version = 3")
