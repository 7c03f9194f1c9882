"""A SQLite decision ledger: O(1) appends on the request path, batched writes off it.

``record()`` runs on the asyncio request path. It appends ``(decision, outcome, at_unix)`` to an
in-memory pending buffer under a lock that is never held across disk I/O: about a microsecond,
whatever the size of the decision (`Decision` and `Outcome` are immutable, so they can be
serialised later). A dedicated writer thread wakes every ``flush_interval_s`` (or as soon as
``batch_size`` records are pending), turns each record into its JSON form (``decision_to_dict``
plus ``at_unix``, serialised with ``orjson``; see `encode_record`) and writes the buffer in
batches of at most ``batch_size`` rows, each batch ONE transaction (``executemany`` inside
``BEGIN IMMEDIATE … COMMIT``, WAL journal, ``synchronous=NORMAL``).

Guarantees:

- never a half-written record: a batch commits whole or not at all, so a crash loses at most the
  rows not yet committed and never corrupts the file;
- a failed write (read-only file, full disk) never raises into the request path: the batch goes
  back to the front of the buffer, the writer retries after a back-off, a warning is logged at
  most once a minute, and beyond ``max_pending`` rows the oldest are dropped and counted in
  ``dropped``;
- ``get()`` sees a record from the moment ``record()`` returns: it reads the database and the
  buffer under the writer's lock, so a row is never missed or seen twice while it moves.

One decision id may be recorded more than once (failed attempts, then the final outcome): every
record is its own row, ordered by an autoincrement ``seq``; ``get()`` returns the last one with
the earlier ones listed, oldest first, under ``"attempts"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from inferplane.errors import ConfigError
from inferplane.ledger.record import Outcome, decision_to_dict
from inferplane.placement.framework import Decision

log = logging.getLogger("inferplane.ledger")

SCHEMA_VERSION = 1
"""The version this code writes and reads. An older file would be migrated here."""

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
    record         TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_by_id ON decisions (decision_id);
CREATE INDEX IF NOT EXISTS decisions_by_tenant_time ON decisions (tenant, at_unix);
"""

_INSERT = (
    "INSERT INTO decisions (decision_id, at_unix, tenant, endpoint, workload_class, status, "
    "ttft_s, cost_usd, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT = "SELECT record FROM decisions WHERE decision_id = ? ORDER BY seq"

Row = tuple[str, float, str, str | None, str, int, float | None, float | None, str]
"""One table row, in ``_INSERT`` column order; the last item is the record's JSON text."""

Pending = tuple[Decision, Outcome, float]
"""One record not yet written: what ``record()`` was given."""


class LedgerFileError(Exception):
    """The file is not a ledger this version can read (not SQLite, or a newer schema)."""


class SqliteLedger:
    """Decision records in one SQLite file (see the module docstring).

    ``path`` must name a file in an existing, writable directory; otherwise the constructor raises
    `ConfigError` naming ``gateway.ledger_path`` in ``source`` (the fleet file). Counters for
    operators and tests: ``batches_written``, ``records_written``, ``write_errors``, ``dropped``.
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
    ) -> None:
        if batch_size <= 0 or flush_interval_s <= 0 or max_pending < batch_size:
            raise ValueError("need batch_size > 0, flush_interval_s > 0, max_pending >= batch_size")
        self.path = Path(path)
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self.retry_interval_s = retry_interval_s
        self.batches_written = 0
        self.records_written = 0
        self.write_errors = 0
        self.dropped = 0
        self._pending: deque[Pending] = deque()
        self._pending_lock = threading.Lock()  # held for O(1) work only, never across I/O
        self._db_lock = threading.Lock()  # the connection, and rows moving buffer → file
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_warning = float("-inf")
        self._conn = _open_for_writing(self.path, source)

    # -- the request path -----------------------------------------------------------------
    def record(self, decision: Decision, outcome: Outcome, at_unix: float) -> None:
        """Queue one record: O(1), no serialisation, no disk, never raises for a disk problem."""
        entry: Pending = (decision, outcome, at_unix)
        with self._pending_lock:
            if len(self._pending) >= self.max_pending:
                self._pending.popleft()
                self.dropped += 1
            self._pending.append(entry)
            full = len(self._pending) >= self.batch_size
        if full and not self._wake.is_set():
            self._wake.set()

    @property
    def pending(self) -> int:
        """Records recorded but not yet committed."""
        return len(self._pending)

    # -- reads ----------------------------------------------------------------------------
    def get(self, decision_id: str) -> dict[str, Any] | None:
        """The last record of ``decision_id`` (earlier ones under ``"attempts"``), or None.

        A short synchronous read meant for the admin route; it waits for a batch being written.
        """
        with self._db_lock:
            texts = [r[0] for r in self._conn.execute(_SELECT, (decision_id,))]
            with self._pending_lock:
                mine = [p for p in self._pending if p[0].decision_id == decision_id]
        for p in mine:
            with contextlib.suppress(TypeError, ValueError):  # the writer will log and drop it
                texts.append(encode_record(*p)[8])
        return merge_records(texts)

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
        """`close` for synchronous callers."""
        if self._stop.is_set() and self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if not self.flush():
            with self._pending_lock:
                lost = len(self._pending)
                self._pending.clear()
                self.dropped += lost
            log.error("ledger %s: closing with %d unwritten records (dropped)", self.path, lost)
        with self._db_lock:
            self._conn.close()

    def flush(self, *, full_batches_only: bool = False) -> bool:
        """Write pending rows now, one transaction per batch of at most ``batch_size``; with
        ``full_batches_only`` leave a last partial batch for later. False when a write failed
        (its rows stay pending)."""
        floor = self.batch_size if full_batches_only else 1
        while len(self._pending) >= floor:
            if not self._write_one_batch():
                return False
        return True

    # -- the writer -----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            # Woken early because a batch is full: write full batches only, so that a steady
            # stream is written in batch_size transactions; on the interval, write everything.
            full = self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            if not self.flush(full_batches_only=full):
                self._stop.wait(self.retry_interval_s)
        # close_sync() writes what is left, in its own thread, after join().

    def _write_one_batch(self) -> bool:
        with self._db_lock:
            with self._pending_lock:
                n = min(self.batch_size, len(self._pending))
                batch = [self._pending.popleft() for _ in range(n)]
            batch, rows = self._encode(batch)
            if not batch:
                return True
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._insert_rows(self._conn, rows)
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
            except BaseException as exc:  # the request path must never see a disk problem
                self._requeue(batch)
                if not isinstance(exc, Exception):
                    raise
                self._write_failed(exc)
                return False
            self.batches_written += 1
            self.records_written += len(batch)
        return True

    def _encode(self, batch: list[Pending]) -> tuple[list[Pending], list[Row]]:
        """Encode a batch; a record that cannot be serialised is dropped (and counted) rather
        than retried forever in front of the others."""
        kept: list[Pending] = []
        rows: list[Row] = []
        for p in batch:
            try:
                rows.append(encode_record(*p))
            except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError
                with self._pending_lock:  # ``dropped`` is also counted by record()
                    self.dropped += 1
                log.error("ledger %s: dropped decision %s: %s", self.path, p[0].decision_id, exc)
                continue
            kept.append(p)
        return kept, rows

    def _insert_rows(self, conn: sqlite3.Connection, rows: Sequence[Row]) -> None:
        """Insert one batch inside the open transaction (a seam for fault-injection tests)."""
        conn.executemany(_INSERT, rows)

    def _requeue(self, batch: list[Pending]) -> None:
        with self._pending_lock:
            self._pending.extendleft(reversed(batch))
            over = len(self._pending) - self.max_pending
            for _ in range(max(0, over)):
                self._pending.popleft()
            self.dropped += max(0, over)

    def _write_failed(self, exc: Exception) -> None:
        self.write_errors += 1
        now = time.monotonic()
        if now - self._last_warning >= 60.0:
            self._last_warning = now
            log.warning(
                "ledger %s: write failed (%s); %d records pending, %d dropped so far; "
                "retrying every %.1fs",
                self.path,
                exc,
                len(self._pending),
                self.dropped,
                self.retry_interval_s,
            )


def encode_record(decision: Decision, outcome: Outcome, at_unix: float) -> Row:
    """The table row of one record; its JSON is ``decision_to_dict(decision, outcome)`` plus
    ``at_unix``.

    ``decision_to_dict`` copies each candidate with ``dataclasses.asdict`` (a recursive deep
    copy, the bulk of its cost); here the candidates and the outcome are handed to ``orjson`` as
    dataclasses instead, which writes the same JSON several times faster.
    """
    rec = decision_to_dict(replace(decision, candidates=()))
    rec["candidates"] = decision.candidates
    rec["outcome"] = outcome
    rec["at_unix"] = at_unix
    return (
        decision.decision_id,
        at_unix,
        decision.profile.tenant,
        outcome.endpoint,
        decision.profile.workload_class,
        outcome.status,
        outcome.ttft_s,
        outcome.cost_usd,
        orjson.dumps(rec).decode(),
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


def read_decision(path: str | Path, decision_id: str) -> dict[str, Any] | None:
    """Read one decision from a ledger file without writing to it (for ``inferplane explain``).

    Raises `FileNotFoundError` for a missing file and `LedgerFileError` for a file that is not a
    ledger of a version this code reads. Rows a running gateway has not flushed yet are not seen.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such ledger file")
    try:
        conn = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise LedgerFileError(f"{p}: cannot open: {exc}") from None
    try:
        _check_version(conn, p, create=False)
        return merge_records(r[0] for r in conn.execute(_SELECT, (decision_id,)))
    except sqlite3.DatabaseError as exc:
        raise LedgerFileError(f"{p}: not a readable ledger: {exc}") from None
    finally:
        conn.close()


def _open_for_writing(path: Path, source: str) -> sqlite3.Connection:
    """Open (creating if needed) a ledger file, or raise `ConfigError` naming the field."""

    def bad(msg: str) -> ConfigError:
        return ConfigError(source, [(CONFIG_FIELD, f"{path}: {msg}")])

    parent = path.parent
    if not parent.is_dir():
        raise bad(f"the directory {str(parent)!r} does not exist")
    if path.exists() and not path.is_file():
        raise bad("exists and is not a file")
    if not _writable(parent) or (path.exists() and not _writable(path)):
        raise bad("not writable")
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise bad(f"cannot open: {exc}") from None
    try:
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


def _writable(p: Path) -> bool:
    return os.access(p, os.W_OK)


def _check_version(conn: sqlite3.Connection, path: Path, *, create: bool) -> None:
    """Check (and with ``create``, initialise) the schema version of an open ledger."""
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
                f"BEGIN IMMEDIATE; {_SCHEMA} INSERT INTO schema_version (version) SELECT "
                f"{SCHEMA_VERSION} WHERE NOT EXISTS (SELECT 1 FROM schema_version); COMMIT;"
            )
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return
    rows = [r[0] for r in conn.execute("SELECT version FROM schema_version")]
    if len(rows) != 1 or not isinstance(rows[0], int):
        raise LedgerFileError(f"{path}: a damaged schema_version table ({rows!r})")
    if rows[0] != SCHEMA_VERSION:
        newer = "a newer" if rows[0] > SCHEMA_VERSION else "an unknown"
        raise LedgerFileError(
            f"{path}: ledger schema version {rows[0]} is {newer} version; this inferplane "
            f"reads version {SCHEMA_VERSION} (use a newer inferplane or another file)"
        )
