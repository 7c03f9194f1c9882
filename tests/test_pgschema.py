"""`pgschema`: the checked names and the versioned migrations the ledger and the batch store
share, against the local PostgreSQL (skipped, saying why, without one)."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from inferplane.batch import postgres_store as batch_pg
from inferplane.ledger import postgres as ledger_pg
from tests.support.postgres import DSN, needs_pg
from tests.test_ledger_postgres import schema as schema  # the fixture


@pytest.mark.parametrize("tables", [ledger_pg.Tables, batch_pg.Tables])
def test_schema_and_prefix_must_be_plain_identifiers(tables: type) -> None:
    for bad in ('x"; DROP TABLE y; --', "Upper", "1st", "a-b", ""):
        with pytest.raises(ValueError, match="must match"):
            tables(bad, "p_")
        with pytest.raises(ValueError, match="must match"):
            tables("s", bad)
    t = tables("s", "p_")
    assert t.version == '"s"."p_schema_version"'
    assert t.lock_key.endswith(":s.p_")


def _tables(conn: psycopg.Connection[tuple[str]], schema: str) -> list[str]:
    rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1",
                        (schema,)).fetchall()
    return [r[0] for r in rows]


@needs_pg
@pytest.mark.parametrize("mod", [ledger_pg, batch_pg])
async def test_replicas_migrating_at_once_make_the_tables_once(mod: object, schema: str) -> None:
    t = mod.Tables(schema, "ip_")  # type: ignore[attr-defined]

    async def one() -> int:
        async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
            return int(await mod.migrate(conn, t))  # type: ignore[attr-defined]

    got = await asyncio.gather(*(one() for _ in range(4)))
    # (a ledger's writers make version 2; its first prune, 3: test_ledger_prune_postgres.py)
    made = getattr(mod, "WRITER_VERSION", mod.SCHEMA_VERSION)  # type: ignore[attr-defined]
    assert got == [made] * 4
    with psycopg.connect(DSN) as conn:
        names = _tables(conn, schema)
        assert "ip_schema_version" in names and len(names) >= 2
        assert conn.execute(f"SELECT version FROM {t.version}").fetchall() == [(made,)]


@needs_pg
@pytest.mark.parametrize("mod", [ledger_pg, batch_pg])
async def test_tables_newer_than_this_inferplane_are_refused_untouched(
        mod: object, schema: str) -> None:
    t = mod.Tables(schema, "ip_")  # type: ignore[attr-defined]
    newer = mod.SCHEMA_VERSION + 1  # type: ignore[attr-defined]
    async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
        await mod.migrate(conn, t)  # type: ignore[attr-defined]
        await conn.execute(f"UPDATE {t.version} SET version = %s", (newer,))
        with pytest.raises(psycopg.errors.FeatureNotSupported,
                           match=f"at schema version {newer}; this inferplane reads"):
            await mod.migrate(conn, t)  # type: ignore[attr-defined]
    with psycopg.connect(DSN) as conn:
        assert conn.execute(f"SELECT version FROM {t.version}").fetchall() == [(newer,)]
