"""What the admission store, the outage journal and the batch lane's store share: the write
transaction they take and how the admission files are opened (`ledger.sqlite` has its own)."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_wal(path: str | Path, schema: str) -> sqlite3.Connection:
    """An autocommit connection to the file ``path`` (its folder created) for one worker
    thread: WAL, ``synchronous=NORMAL``, waiting up to 10 s for another process's write lock;
    ``schema`` (``CREATE … IF NOT EXISTS`` statements) run on it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(schema)
    return conn


class immediate:
    """``with immediate(c):`` one ``BEGIN IMMEDIATE`` … ``COMMIT`` transaction on an autocommit
    connection (``isolation_level=None``): the write lock is taken at its start, so two processes
    on one file serialise instead of failing at commit; ``ROLLBACK`` when the block raises
    (anything, cancellation included)."""

    __slots__ = ("c",)

    def __init__(self, c: sqlite3.Connection) -> None:
        self.c = c

    def __enter__(self) -> None:
        self.c.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.c.execute("ROLLBACK" if exc_type is not None else "COMMIT")
