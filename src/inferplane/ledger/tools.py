"""What ``inferplane verify``, ``export`` and ``ledger-keygen`` do, apart from argument parsing.

A `Source` is the ledger a command reads: a SQLite file (``--ledger FILE``, or the fleet file's
``gateway.ledger_path``) or the fleet file's PostgreSQL ledger. Readers never write.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from inferplane.config.dsn import postgres_dsn
from inferplane.config.schema import FleetConfig
from inferplane.errors import first_line
from inferplane.ledger.chain import (
    Checkpoint,
    PruneAnchor,
    Signer,
    load_public,
)
from inferplane.ledger.query import WRITERS, ExportRow, Query
from inferplane.ledger.verify import (
    Keys,
    Report,
    describe_anchor,
    verify_rows,
    verify_sqlite,
)

if TYPE_CHECKING:
    import psycopg

    from inferplane.ledger.postgres import Tables


class SourceError(Exception):
    """The ledger cannot be read (the message says why and where)."""


@dataclass(frozen=True, slots=True)
class Source:
    sqlite_path: str | None = None
    dsn: str | None = None
    schema: str = "public"
    prefix: str = "inferplane_"
    public_key: Ed25519PublicKey | None = None
    checkpoint_every: int | None = None
    """The configured ``ledger.checkpoint_every`` (None: not from a fleet file)."""

    @property
    def name(self) -> str:
        return self.sqlite_path or f"postgres {self.schema}.{self.prefix}decisions"


def source_from_config(config: FleetConfig, file: str) -> Source:
    """The ledger a fleet file configures, with the public half of its signing key."""
    from inferplane.ledger.build import configured_signer

    signer = configured_signer(config, file)
    public = signer.public if signer is not None else None
    dsn = postgres_dsn(config, "ledger", file)
    if dsn:
        return Source(dsn=dsn, schema=config.ledger.postgres_schema,
                      prefix=config.ledger.table_prefix, public_key=public,
                      checkpoint_every=config.ledger.checkpoint_every)
    if config.gateway.ledger_path:
        return Source(sqlite_path=config.gateway.ledger_path, public_key=public,
                      checkpoint_every=config.ledger.checkpoint_every)
    raise SourceError(f"{file}: no ledger configured (set gateway.ledger_path or "
                      "ledger.postgres_dsn); records were kept in memory only")


def read_public_key(path: Path) -> Ed25519PublicKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SourceError(f"{path}: {exc.strerror or exc}") from None
    from inferplane.ledger.chain import KeyError_

    try:
        return load_public(data, str(path))
    except KeyError_ as exc:
        raise SourceError(str(exc)) from None


@contextlib.contextmanager
def _sqlite_readonly(path: str) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the SQLite ledger at ``path``, closed after the ``with``
    block; a missing or unreadable file is a `SourceError`."""
    from inferplane.ledger import sqlite

    try:
        conn = sqlite.open_readonly(path)
    except (FileNotFoundError, sqlite.LedgerFileError) as exc:
        raise SourceError(str(exc)) from None
    try:
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def _postgres(source: Source) -> Iterator[tuple[psycopg.Connection[Any], Tables]]:
    """A reader's connection to the source's PostgreSQL ledger, its tables checked; a
    connection, table or query error (in the ``with`` block too) is a `SourceError`."""
    import psycopg

    from inferplane.ledger import postgres as pg

    assert source.dsn is not None
    t = pg.Tables(source.schema, source.prefix)
    try:
        with pg.connect_sync(source.dsn) as conn:
            pg.check_tables(conn, t)
            yield conn, t
    except (psycopg.Error, LookupError) as exc:
        raise SourceError(f"{source.name}: {first_line(exc)}") from None


DEFAULT_CHECKPOINT_EVERY = 1000
"""``ledger.checkpoint_every``'s default: what verify holds a ledger named by ``--ledger`` to."""


def verify(source: Source, public_key: Keys,
           checkpoint_every: int | None = None) -> Report:
    """Verify ``source``; with a key (or a keyring: `verify.Keys`), a shard's unsigned tail
    is held to ``checkpoint_every`` (default: the fleet file's, else
    `DEFAULT_CHECKPOINT_EVERY`)."""
    key = public_key or source.public_key
    every = checkpoint_every or source.checkpoint_every or DEFAULT_CHECKPOINT_EVERY
    return _verify(source, key, every)


def _verify(source: Source, key: Keys, every: int | None, rotation: bool = False) -> Report:
    if source.sqlite_path is not None:
        from inferplane.ledger.sqlite import LedgerFileError

        try:
            return verify_sqlite(source.sqlite_path, key, every, rotation)
        except (FileNotFoundError, LedgerFileError) as exc:
            raise SourceError(str(exc)) from None
    from inferplane.ledger import postgres as pg

    with _postgres(source) as (conn, t):
        return verify_rows(
            pg.iter_rows(conn, t, order="shard, chain_seq, id"),
            pg.read_checkpoints(conn, t), pg.read_heads(conn, t), key, every,
            pg.read_anchors(conn, t), rotation,
        )


_RESIGN = ("UPDATE {table} SET key_id = {p}, signature = {p} WHERE shard = {p} AND "
           "first_seq = {p} AND key_id = {p} AND signature = {p}")
"""Re-sign one prune anchor (its fields unchanged) with the new key at a key change."""


def sign_heads(
    source: Source, signer: Signer, shards: Sequence[str] = (),
    previous: Sequence[Ed25519PublicKey] = (),
) -> tuple[Report, list[Checkpoint]]:
    """Sign each shard's current head (or only ``shards``') with the key holder's ``signer``:
    the way out for a shard written without the key (an upgrade that turned signing on, a
    migrated or archived file), which verify with a key fails by its unsigned-tail rule.

    The whole ledger is verified first (hash links, columns, existing signatures; not the
    tail rule) and nothing is signed unless it is intact: a checkpoint is the key holder's
    attestation of the chain up to it. Each checkpoint signs the head that verify read (a
    writer appending meanwhile does not matter: the checkpoint names a past record). Shards
    whose head is already signed are left alone. ``previous``: the public keys of earlier
    signing keys (the key change itself): the ledger is verified with them and ``signer``'s,
    every head not signed by ``signer``'s key is signed, and every shard's latest prune anchor
    an earlier key signed is re-signed with ``signer``'s key (in the same transaction), so
    that from then on an earlier key is trusted only for what it signed before (`verify.Keys`).
    Returns the report and what was signed (checkpoints; `resigned_anchors` counts anchors)."""
    rep = _verify(source, [signer.public, *previous], None, rotation=bool(previous))
    if not rep.ok:
        return rep, []
    unknown = sorted(set(shards) - set(rep.shards))
    if unknown:
        raise SourceError(f"{source.name}: no shard {', '.join(unknown)} (shards: "
                          f"{', '.join(sorted(rep.shards)) or 'none'})")
    now = time.time()
    chosen = sorted(shards or rep.shards)
    cps = [signer.sign(s, rep.shards[s], rep.last_hash[s], now) for s in chosen
           if rep.shards[s] > 0 and (rep.unsigned_tail.get(s, 0) > 0 or (
               previous and rep.current_signed.get(s, 0) != rep.shards[s]))]
    old = [rep.pruned[s] for s in chosen
           if previous and s in rep.pruned and rep.pruned[s].key_id != signer.key_id]
    new = [signer.sign_anchor(a.shard, a.first_seq, a.prev_hash, a.before_unix, a.at_unix)
           for a in old]
    rep.resigned_anchors = len(new)
    if not cps and not new:
        return rep, []
    if source.sqlite_path is not None:
        from inferplane.ledger.sqlite import write_checkpoints

        try:
            conn = sqlite3.connect(source.sqlite_path, timeout=30.0)
            try:
                with conn:
                    write_checkpoints(conn, cps)
                    for a, b in zip(old, new, strict=True):
                        conn.execute(_RESIGN.format(table="prune_anchors", p="?"),
                                     (b.key_id, b.signature, a.shard, a.first_seq, a.key_id,
                                      a.signature))
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise SourceError(f"{source.name}: cannot write the checkpoints: {exc}") from None
        return rep, cps
    import psycopg

    from inferplane.ledger import postgres as pg

    assert source.dsn is not None
    t = pg.Tables(source.schema, source.prefix)
    try:
        with psycopg.connect(source.dsn, connect_timeout=5) as conn_pg:
            with conn_pg.cursor() as cur:
                if cps:
                    cur.executemany(*pg.checkpoint_insert(t, cps))
                for a, b in zip(old, new, strict=True):
                    cur.execute(_RESIGN.format(table=t.anchors, p="%s"),
                                (b.key_id, b.signature, a.shard, a.first_seq, a.key_id,
                                 a.signature))
            conn_pg.commit()
    except psycopg.Error as exc:
        raise SourceError(
            f"{source.name}: cannot write the checkpoints: {first_line(exc)}"
        ) from None
    return rep, cps


def describe(rep: Report, source: Source) -> list[str]:
    """The lines ``inferplane verify`` prints."""
    lines: list[str] = []
    if not rep.ok:
        lines.append(f"TAMPERED: {source.name}: {rep.problem}")
        if rep.bad_decision:
            lines.append(f"first bad record: shard {rep.bad_shard} seq {rep.bad_seq} "
                         f"decision {rep.bad_decision}")
        return lines
    shards = ", ".join(_span(rep, s, n) for s, n in sorted(rep.shards.items())) or "none"
    lines.append(f"ok: {source.name}: {rep.records} records intact in {len(rep.shards)} "
                 f"chain(s): {shards}")
    lines.append(f"checkpoints: {rep.checkpoints_checked} of {rep.checkpoints} signatures "
                 "verified" + (f" ({rep.checkpoints_pruned} more name pruned records)"
                               if rep.checkpoints_pruned else "")
                 + (f" with the keyring {', '.join(rep.key_ids)}"
                    if len(rep.key_ids) > 1 else ""))
    if rep.anchors:
        history = rep.anchors - rep.anchors_latest
        lines.append(f"prune anchors: {rep.anchors_checked} of {rep.anchors_latest} signatures "
                     "verified" + (f" ({history} earlier kept as history, unchecked)"
                                   if history else "") + "; " + "; ".join(
                         f"{s} starts at #{a.first_seq} ({describe_anchor(a)})"
                         for s, a in sorted(rep.pruned.items())))
    if rep.keyed and rep.unsigned_tail:
        bound = (f"; at most {rep.checkpoint_every} - 1 allowed"
                 if rep.checkpoint_every is not None else "")
        lines.append(f"records after the last verified checkpoint (not yet signed{bound}): "
                     + ", ".join(f"{s}: {n}" for s, n in sorted(rep.unsigned_tail.items())))
    lines += [f"warning: {w}" for w in rep.warnings]
    return lines


def _span(rep: Report, shard: str, last: int) -> str:
    first = rep.first.get(shard, 1)
    if shard not in rep.pruned:
        return f"{shard} (#1..#{last})"
    if last < first:
        return f"{shard} (none kept; #1..#{first - 1} pruned)"
    return f"{shard} (#{first}..#{last}; #1..#{first - 1} pruned)"


def read_anchors(source: Source) -> list[PruneAnchor]:
    """The source's prune anchors, oldest first (what ``export`` states)."""
    if source.sqlite_path is not None:
        from inferplane.ledger import sqlite

        with _sqlite_readonly(source.sqlite_path) as conn:
            return sqlite.read_anchors(conn)
    from inferplane.ledger import postgres as pg

    with _postgres(source) as (conn_pg, t):
        return pg.read_anchors(conn_pg, t)


@contextlib.contextmanager
def export_rows(source: Source, q: Query | None) -> Iterator[Iterator[ExportRow]]:
    """The selected records in storage order, streamed."""
    if source.sqlite_path is not None:
        from inferplane.ledger import sqlite

        with _sqlite_readonly(source.sqlite_path) as conn:
            yield sqlite.iter_rows(conn, q)
        return
    import psycopg

    from inferplane.ledger import postgres as pg

    assert source.dsn is not None
    t = pg.Tables(source.schema, source.prefix)
    try:
        conn_pg = pg.connect_sync(source.dsn)
    except psycopg.Error as exc:
        raise SourceError(f"{source.name}: {first_line(exc)}") from None
    try:
        try:
            pg.check_tables(conn_pg, t)
        except LookupError as exc:
            raise SourceError(f"{source.name}: {exc}") from None
        yield pg.iter_rows(conn_pg, t, q)
    finally:
        conn_pg.close()


def export(source: Source, q: Query | None, fmt: str, out: IO[bytes]) -> int:
    """Write the selected records to ``out`` in ``fmt``; return how many. PostgreSQL builds
    the lines itself and streams them with COPY (`postgres.COPY_WRITERS`). A pruned shard's
    latest prune anchor goes with them (NDJSON's first lines, Parquet's metadata), read in the
    same snapshot as the records, so the export's chain can be verified from the file alone
    (`verify.verify_export`)."""
    from inferplane.ledger.chain import latest_anchors

    def starts(anchors: list[PruneAnchor]) -> list[PruneAnchor]:
        return [a for _, a in sorted(latest_anchors(anchors).items())]

    if source.sqlite_path is not None:
        from inferplane.ledger import sqlite

        with _sqlite_readonly(source.sqlite_path) as conn:
            conn.execute("BEGIN")  # one read transaction: anchors and records of one state
            try:
                anchors = starts(sqlite.read_anchors(conn))
                return WRITERS[fmt](sqlite.iter_rows(conn, q), out, anchors)
            finally:
                conn.rollback()
    from inferplane.ledger import postgres as pg

    with _postgres(source) as (conn_pg, t):  # one repeatable-read transaction
        return pg.COPY_WRITERS[fmt](conn_pg, t, q, out, starts(pg.read_anchors(conn_pg, t)))


def read_one(source: Source, decision_id: str) -> dict[str, Any] | None:
    """One decision (its last record, earlier ones under ``attempts``), for ``explain``."""
    if source.sqlite_path is not None:
        from inferplane.ledger.sqlite import LedgerFileError, read_decision

        try:
            return read_decision(source.sqlite_path, decision_id)
        except (FileNotFoundError, LedgerFileError) as exc:
            raise SourceError(str(exc)) from None
    from inferplane.ledger.sqlite import merge_records

    with _postgres(source) as (conn, t):
        rows = conn.execute(
            f"SELECT record FROM {t.decisions} WHERE decision_id = %s ORDER BY id",
            (decision_id,)).fetchall()
    return merge_records(r[0] for r in rows)
