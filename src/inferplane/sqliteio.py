"""What the SQLite-backed stores share: the write transaction every one of them takes (the
admission counters, the outage journal, the batch lane)."""

from __future__ import annotations

import sqlite3


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
