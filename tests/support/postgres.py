"""The local PostgreSQL the tests use (``INFERPLANE_TEST_PG``, default 127.0.0.1:5432, database
``test``): whether one answers, and the schemas the tests make in it."""

from __future__ import annotations

import os

import psycopg
import pytest

from inferplane.errors import first_line

DSN = os.environ.get("INFERPLANE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _why_absent() -> str | None:
    try:
        with psycopg.connect(DSN, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"no PostgreSQL at {DSN}: {first_line(exc)}"
    return None


ABSENT = _why_absent()
"""Why no PostgreSQL answers at `DSN` (None: one does), asked once per test run."""

needs_pg = pytest.mark.skipif(ABSENT is not None, reason=ABSENT or "")
"""Skips a test, saying why, when no PostgreSQL answers."""


def drop_schema(name: str) -> None:
    """Drop a test's schema and everything in it."""
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
