"""The PostgreSQL tables of one part of the plane (the ledger, the batch store).

Both keep their tables in ``<schema>."<prefix><table>"``, with the schema and the prefix
checked as plain identifiers (they are written into SQL, never bound), and both bring their
tables to the version this inferplane reads at start: numbered migrations, migration ``i``
taking version ``i`` to ``i + 1``, all of a start's in one transaction under an advisory lock,
so that replicas starting together wait for one another and the later ones find the work done.
A database at a newer version than this inferplane reads is refused, never downgraded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import psycopg

IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


class PgTables:
    """Quoted, qualified table names of one part (``part``: ``ledger``, ``batch``).

    ``fields`` names the two settings the schema and the prefix come from, for the error."""

    def __init__(self, schema: str, prefix: str, *, part: str,
                 fields: tuple[str, str]) -> None:
        for what, v in zip(fields, (schema, prefix), strict=True):
            if not IDENT.match(v):
                raise ValueError(f"{what} {v!r} must match {IDENT.pattern}")
        self.schema = schema
        self.prefix = prefix
        self.part = part
        self.version = self.table("schema_version")
        self.lock_key = f"inferplane-{part}:{schema}.{prefix}"

    def table(self, name: str) -> str:
        """``"schema"."<prefix>name"``."""
        return f'"{self.schema}"."{self.prefix}{name}"'


async def migrate(conn: psycopg.AsyncConnection[Any], t: PgTables,
                  migrations: Sequence[Sequence[str]], *, reads: int | None = None) -> int:
    """Bring ``t``'s tables to version ``len(migrations)`` at least; return the version they
    are at. Tables at a later version up to ``reads`` (this inferplane reads and writes them as
    they are) are left as they are; beyond it they are refused."""
    target = len(migrations)
    async with conn.transaction(), conn.cursor() as cur:
        await cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (t.lock_key,))
        await cur.execute("SELECT to_regclass(%s)", (t.version,))
        row = await cur.fetchone()
        version = 0
        if row is not None and row[0] is not None:
            await cur.execute(f"SELECT version FROM {t.version}")
            got = await cur.fetchone()
            version = int(got[0]) if got else 0
        if version > max(target, reads or 0):
            raise psycopg.errors.FeatureNotSupported(
                f"{t.part} tables are at schema version {version}; this inferplane reads "
                f"{max(target, reads or 0)}")
        if version > target:
            return version
        for step in migrations[version:]:
            for stmt in step:
                await cur.execute(stmt)
        if version == 0:
            await cur.execute(f"CREATE TABLE IF NOT EXISTS {t.version} (version INT NOT NULL)")
            await cur.execute(f"INSERT INTO {t.version} VALUES (%s)", (target,))
        elif version < target:
            await cur.execute(f"UPDATE {t.version} SET version = %s", (target,))
    return target

