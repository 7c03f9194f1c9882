"""The PostgreSQL ledger's local spool: records held in a SQLite file while the database is down.

A gateway answers with a receipt before its record reaches PostgreSQL only when the database
is down (`PostgresLedger.store_down`). Without a spool those records live in memory, and a
restart during the outage loses them: their receipts then look like deleted records. With
``ledger.spool_path`` the writer moves every pending record into this file (one transaction,
``synchronous=NORMAL`` in WAL mode: a killed process loses nothing committed, a power cut may
lose the last transactions) before the answer completes, and replays the file in its order
(the order the records were made) before any newer record once the database answers again,
at this start or the next. A replayed record already in the database (written just before a
crash that left it in the file) is skipped by its decision id and receipt.

The replay re-checks each spooled record before chaining it: its text must hash to its receipt
and its columns must be the record's own values. One that does not (the file edited, or
damaged) is **refused**, not signed into the chain: it is moved to the file's ``refused``
table, kept for inspection, and logged at ERROR (`refusal`).
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import orjson

from inferplane.ledger.query import column_mismatch
from inferplane.ledger.record import Entry
from inferplane.sqliteio import immediate, open_wal

# the record's columns, the same in both tables: a refused record is moved over by copying them
_COLUMN_DEFS = """
    decision_id    TEXT NOT NULL,
    at_unix        REAL NOT NULL,
    tenant         TEXT NOT NULL,
    endpoint       TEXT,
    workload_class TEXT,
    model          TEXT,
    substrate      TEXT,
    status         INTEGER,
    ttft_s         REAL,
    cost_usd       REAL,
    record         TEXT NOT NULL,
    receipt        TEXT NOT NULL"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS spooled (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,{_COLUMN_DEFS}
);
CREATE INDEX IF NOT EXISTS spooled_by_decision ON spooled (decision_id);
CREATE TABLE IF NOT EXISTS refused (
    id             INTEGER PRIMARY KEY,{_COLUMN_DEFS},
    why            TEXT NOT NULL
);
"""
_COLS = ("decision_id, at_unix, tenant, endpoint, workload_class, model, substrate, status, "
         "ttft_s, cost_usd, record, receipt")


def refusal(e: Entry) -> str | None:
    """Why a spooled record must not be written (its text does not hash to its receipt, or a
    column is not the record's own value), or None."""
    if hashlib.sha256(e.text.encode()).hexdigest() != e.receipt:
        return "its text does not match its receipt (edited)"
    try:
        col = column_mismatch(e, orjson.loads(e.text))
    except orjson.JSONDecodeError:
        col = "record"
    return None if col is None else f"column {col} is not the value in the record (edited)"


class Spool:
    """One SQLite spool file; its methods block (call them off the event loop)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection = open_wal(self.path, _SCHEMA)

    def add(self, entries: Sequence[Entry]) -> None:
        """Append ``entries`` in order, in one transaction."""
        with self._lock, immediate(self._conn):
            self._conn.executemany(
                f"INSERT INTO spooled ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(e.decision_id, e.at_unix, e.tenant, e.endpoint, e.workload_class, e.model,
                  e.substrate, e.status, e.ttft_s, e.cost_usd, e.text, e.receipt)
                 for e in entries])

    def oldest(self, n: int) -> list[tuple[int, Entry]]:
        """The ``n`` oldest spooled records (left in the file until `remove`)."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT id, {_COLS} FROM spooled ORDER BY id LIMIT ?", (n,)).fetchall()
        return [(r[0], Entry(decision_id=r[1], at_unix=r[2], tenant=r[3], endpoint=r[4],
                             workload_class=r[5], model=r[6], substrate=r[7], status=r[8],
                             ttft_s=r[9], cost_usd=r[10], text=r[11], receipt=r[12]))
                for r in rows]

    def refuse(self, refused: Sequence[tuple[int, str]]) -> None:
        """Move the records ``(id, why)`` to the ``refused`` table, in one transaction."""
        if not refused:
            return
        with self._lock, immediate(self._conn):
            for i, why in refused:
                self._conn.execute(f"INSERT INTO refused (id, {_COLS}, why) SELECT id, {_COLS}, "
                                   "? FROM spooled WHERE id = ?", (why, i))
                self._conn.execute("DELETE FROM spooled WHERE id = ?", (i,))

    def refused(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM refused").fetchone()[0])

    def remove(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        with self._lock, immediate(self._conn):
            self._conn.executemany("DELETE FROM spooled WHERE id = ?", [(i,) for i in ids])

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM spooled").fetchone()[0])

    def texts(self, decision_id: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self._conn.execute(
                "SELECT record FROM spooled WHERE decision_id = ? ORDER BY id", (decision_id,))]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
