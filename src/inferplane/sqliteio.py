"""What the admission store, the outage journal and the batch lane's store share: the write
transaction they take and how the admission files are opened (`ledger.sqlite` has its own)."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_wal(path: str | Path, schema: str) -> sqlite3.Connection:
    """An autocommit connection to the file ``path`` for one worker thread: WAL,
    ``synchronous=NORMAL``, waiting up to 10 s for another process's write lock; ``schema``
    (``CREATE … IF NOT EXISTS`` statements) run on it. Its folder is never created: one that
    is missing is a configuration mistake (`admission.controller.store_problems`), and SQLite
    says it cannot open the file."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(schema)
    return conn


class immediate:
    """``with immediate(c):`` one ``BEGIN IMMEDIATE`` … ``COMMIT`` transaction on an autocommit
    connection (``isolation_level=None``): the write lock is taken at its start, so two processes
    on one file serialise instead of failing at commit; ``ROLLBACK`` when the block raises
    (anything, cancellation included) or the ``COMMIT`` fails (a full disk leaves the transaction
    open). ``write=False``: a plain ``BEGIN``, a read that takes no write lock."""

    __slots__ = ("c", "write")

    def __init__(self, c: sqlite3.Connection, write: bool = True) -> None:
        self.c = c
        self.write = write

    def __enter__(self) -> None:
        self.c.execute("BEGIN IMMEDIATE" if self.write else "BEGIN")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        c = self.c
        if exc_type is None:
            try:
                c.execute("COMMIT")
                return
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
        if c.in_transaction:
            c.execute("ROLLBACK")
