"""`inferplane.sqliteio`: the write transaction and the WAL file the admission store, the
outage journal and the batch lane's store share."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from inferplane.sqliteio import immediate, open_wal


def _db(tmp_path: Path) -> sqlite3.Connection:
    (tmp_path / "deep" / "folder").mkdir(parents=True, exist_ok=True)
    return open_wal(tmp_path / "deep" / "folder" / "a.db",
                    "CREATE TABLE IF NOT EXISTS t (v INTEGER);")


def test_open_wal_never_creates_a_folder(tmp_path: Path) -> None:
    """harden27: a missing folder is a mistake in the fleet file (caught at start with the
    field named: `admission.controller.store_problems`), not something to create."""
    with pytest.raises(sqlite3.OperationalError, match="unable to open database file"):
        open_wal(tmp_path / "typo" / "a.db", "CREATE TABLE IF NOT EXISTS t (v INTEGER);")
    assert not (tmp_path / "typo").exists()


def test_open_wal_uses_wal(tmp_path: Path) -> None:
    c = _db(tmp_path)
    try:
        assert (tmp_path / "deep" / "folder" / "a.db").is_file()
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    finally:
        c.close()


def test_immediate_commits_a_block_and_rolls_back_one_that_raises(tmp_path: Path) -> None:
    c = _db(tmp_path)
    try:
        with pytest.raises(KeyError), immediate(c):
            c.execute("INSERT INTO t VALUES (1)")
            assert c.in_transaction
            raise KeyError("x")
        assert not c.in_transaction
        assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 0
        with immediate(c):
            c.execute("INSERT INTO t VALUES (2)")
        assert not c.in_transaction
        other = sqlite3.connect(tmp_path / "deep" / "folder" / "a.db")
        try:  # committed: another connection sees the row
            assert other.execute("SELECT v FROM t").fetchall() == [(2,)]
        finally:
            other.close()
    finally:
        c.close()
