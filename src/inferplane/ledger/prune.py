"""``inferplane ledger-prune``: delete whole checkpoint intervals before a time, behind a signed
prune anchor (docs/evidence.md, Retention).

For each shard, the **cut** is the last checkpoint verified with the key whose records all
precede the first record made at or after ``before`` (so no record made at or after it is
deleted): records from the shard's current start through the cut go, and a `PruneAnchor`
signed by the key holder (shard, ``first_seq`` = cut + 1, ``prev_hash`` = the cut's chain hash,
which its checkpoint signs) becomes the start of the chain that `verify` accepts.

The whole ledger is verified first, with the key and the unsigned-tail rule, and nothing is
pruned unless it is intact. Each shard is then pruned in one transaction (the anchor, the
records and the checkpoints of the pruned records together: a crash leaves the old state or
the new one), which first checks that nothing it relies on changed since the verify: the shard
starts where it did (another prune did not run meanwhile; PostgreSQL prunes of one shard are
serialised by an advisory lock, SQLite ones by its write lock), the cut record still has the
signed chain hash, and exactly the verified records are deleted. Writers go on appending while
it runs: they only ever add records after the shard's head, which a prune never moves (a
whole shard pruned up to its head keeps its head, and its next record follows the anchor's
``prev_hash``); a checkpoint a writer signs of a head pruned the moment before names a record
no longer stored, which verify leaves out.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from inferplane.errors import first_line
from inferplane.ledger.chain import PruneAnchor, Signer
from inferplane.ledger.tools import Source, SourceError, verify
from inferplane.ledger.verify import Report


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """What pruning one shard deletes: records ``first``..``cut``."""

    shard: str
    first: int
    cut: int
    cut_hash: str
    last: int
    """The shard's last record when verified."""
    left_before: int
    """Records made before the cut-off that stay (after the cut: a part interval)."""

    @property
    def count(self) -> int:
        return self.cut - self.first + 1


@dataclass(slots=True)
class Outcome:
    report: Report
    plans: list[ShardPlan] = field(default_factory=list)
    anchors: list[PruneAnchor] = field(default_factory=list)
    """The anchors written (none in a dry run)."""
    idle: dict[str, str] = field(default_factory=dict)
    """Shards with nothing to prune, and why."""
    nothing_before: bool = False
    """No selected shard holds a record made before the cut-off, nor was ever pruned: refused
    (exit 2; most likely the wrong time)."""


class _Store:
    """The few statements a prune needs, on one backend (SQLite ``?``, PostgreSQL ``%s``)."""

    def __init__(self, conn: Any, mark: str, decisions: str, checkpoints: str,
                 anchors: str) -> None:
        self.conn, self.m = conn, mark
        self.d, self.c, self.a = decisions, checkpoints, anchors

    def one(self, sql: str, *args: Any) -> Any:
        row = self.conn.execute(sql.replace("?", self.m), args).fetchone()
        return None if row is None else row[0]

    def first_after(self, shard: str, before: float) -> int | None:
        """The first seq of ``shard`` made at or after ``before``."""
        got = self.one(f"SELECT min(chain_seq) FROM {self.d} WHERE shard = ? AND at_unix >= ?",
                       shard, before)
        return None if got is None else int(got)

    def count_before(self, shard: str, before: float, after_seq: int = 0) -> int:
        return int(self.one(f"SELECT count(*) FROM {self.d} WHERE shard = ? AND at_unix < ? "
                            "AND chain_seq > ?", shard, before, after_seq))

    def start(self, shard: str) -> int:
        got = self.one(f"SELECT max(first_seq) FROM {self.a} WHERE shard = ?", shard)
        return 1 if got is None else int(got)

    def prune(self, p: ShardPlan, a: PruneAnchor) -> None:
        """Inside the caller's transaction: check, write the anchor, delete."""
        changed = "the ledger changed since it was verified"
        start = self.start(p.shard)
        if start != p.first:
            raise SourceError(f"shard {p.shard}: {changed} (it now starts at #{start}, not "
                              f"#{p.first}: another prune?); nothing pruned, run it again")
        if self.one(f"SELECT chain_hash FROM {self.d} WHERE shard = ? AND chain_seq = ?",
                    p.shard, p.cut) != p.cut_hash:
            raise SourceError(f"shard {p.shard}: {changed} (record #{p.cut}); nothing pruned")
        m = self.m
        self.conn.execute(
            f"INSERT INTO {self.a} (shard, first_seq, prev_hash, before_unix, at_unix, key_id, "
            f"signature) VALUES ({m}, {m}, {m}, {m}, {m}, {m}, {m})",
            (a.shard, a.first_seq, a.prev_hash, a.before_unix, a.at_unix, a.key_id,
             a.signature))
        cur = self.conn.execute(
            f"DELETE FROM {self.d} WHERE shard = {m} AND chain_seq <= {m}", (p.shard, p.cut))
        if cur.rowcount != p.count:
            raise SourceError(f"shard {p.shard}: {changed} ({cur.rowcount} records up to "
                              f"#{p.cut}, {p.count} verified); nothing pruned")
        self.conn.execute(f"DELETE FROM {self.c} WHERE shard = {m} AND seq <= {m}",
                          (p.shard, p.cut))


def plan(store: _Store, rep: Report, before: float, shards: Sequence[str],
         max_records: int | None = None) -> Outcome:
    """Each selected shard's cut (`ShardPlan`), from a verified report (keyed). With
    ``max_records``, a shard's cut is reached in steps (one `ShardPlan`, transaction and anchor
    each) of at most that many records, or of one checkpoint interval where one is longer."""
    out = Outcome(rep)
    some_before = False
    for s in shards:
        first, last = rep.first.get(s, 1), rep.shards[s]
        n_before = store.count_before(s, before)
        some_before = some_before or n_before > 0 or s in rep.pruned
        k = store.first_after(s, before)
        cuts = [(q, h) for q, h in rep.signed.get(s, []) if k is None or q < k]
        if not n_before:
            out.idle[s] = ("nothing before the cut-off" if s not in rep.pruned else
                           f"nothing before the cut-off (already pruned up to #{first - 1})")
        elif not cuts:
            out.idle[s] = (f"{n_before} records before the cut-off, but no signed checkpoint "
                           "follows them before the first later record (only whole checkpoint "
                           "intervals are pruned; a later prune takes them)")
        else:
            cut = cuts[-1][0]
            for q, h in _steps(first, cuts, max_records):
                out.plans.append(ShardPlan(s, first, q, h, last,
                                           store.count_before(s, before, cut) if q == cut
                                           else 0))
                first = q + 1
    out.nothing_before = not some_before
    return out


def _steps(first: int, cuts: list[tuple[int, str]],
           max_records: int | None) -> list[tuple[int, str]]:
    """The cuts that take a shard from ``first`` to ``cuts[-1]``: each the furthest signed
    checkpoint at most ``max_records`` on (at least the next one), or the last at once."""
    if max_records is None:
        return [cuts[-1]]
    steps: list[tuple[int, str]] = []
    i = 0
    while i < len(cuts):
        j = i
        while j + 1 < len(cuts) and cuts[j + 1][0] - first + 1 <= max_records:
            j += 1
        steps.append(cuts[j])
        first, i = cuts[j][0] + 1, j + 1
    return steps


def prune(source: Source, signer: Signer, before: float, shards: Sequence[str] = (), *,
          dry_run: bool = False, checkpoint_every: int | None = None,
          now: float | None = None, max_records: int | None = None,
          previous: Sequence[Ed25519PublicKey] = ()) -> Outcome:
    """Verify ``source`` with ``signer``'s key; then (unless ``dry_run``) prune each selected
    shard (all by default) up to its cut, one transaction a shard (or, with ``max_records``,
    one a step of at most that many records, each with its own anchor). Raises `SourceError` when
    the ledger cannot be read or written, a shard is unknown, or it changed meanwhile.

    After a signing-key change, ``previous`` holds the public keys of the earlier signing
    keys: the ledger is verified with all of them and ``signer``'s (a keyring, each
    signature checked with the key its ``key_id`` names), so a cut may be a checkpoint an
    earlier key signed; the anchor is signed by ``signer``."""
    rep = verify(source, [signer.public, *previous], checkpoint_every)
    if not rep.ok:
        return Outcome(rep)
    unknown = sorted(set(shards) - set(rep.shards))
    if unknown:
        raise SourceError(f"{source.name}: no shard {', '.join(unknown)} (shards: "
                          f"{', '.join(sorted(rep.shards)) or 'none'})")
    chosen = sorted(shards or rep.shards)
    if source.sqlite_path is not None:
        return _prune_sqlite(source, signer, rep, before, chosen, dry_run, now, max_records)
    return _prune_postgres(source, signer, rep, before, chosen, dry_run, now, max_records)


def _prune_sqlite(source: Source, signer: Signer, rep: Report, before: float,
                  shards: list[str], dry_run: bool, now: float | None,
                  max_records: int | None = None) -> Outcome:
    from inferplane.errors import ConfigError
    from inferplane.ledger import sqlite as lsql
    from inferplane.sqliteio import immediate

    assert source.sqlite_path is not None
    path = source.sqlite_path

    def cannot(exc: Exception) -> SourceError:
        return SourceError(f"{source.name}: cannot prune: {exc}")

    try:  # the plan first, read-only: a run that prunes nothing changes nothing (no migration)
        conn = lsql.open_readonly(path)
    except (ConfigError, FileNotFoundError, lsql.LedgerFileError) as exc:
        raise SourceError(str(exc)) from None
    except sqlite3.Error as exc:
        raise cannot(exc) from None
    try:
        out = plan(_Store(conn, "?", "decisions", "checkpoints", "prune_anchors"), rep, before,
                   shards, max_records)
    except sqlite3.Error as exc:
        raise cannot(exc) from None
    finally:
        conn.close()
    if dry_run or not out.plans:
        return out
    try:  # to prune, opened for writing: a version-2 file gets the anchors' table (3)
        conn = lsql.open_for_writing(path, path)
        lsql.migrate_2_to_3(conn)
    except (ConfigError, FileNotFoundError, lsql.LedgerFileError) as exc:
        raise SourceError(str(exc)) from None
    except sqlite3.Error as exc:
        raise cannot(exc) from None
    try:
        conn.execute("PRAGMA busy_timeout=30000")
        store = _Store(conn, "?", "decisions", "checkpoints", "prune_anchors")
        for p in out.plans:
            a = _anchor(signer, p, before, now)
            with _so_far(out), immediate(conn):
                store.prune(p, a)
            out.anchors.append(a)
        return out
    except sqlite3.Error as exc:
        raise cannot(exc) from None
    finally:
        conn.close()


def _prune_postgres(source: Source, signer: Signer, rep: Report, before: float,
                    shards: list[str], dry_run: bool, now: float | None,
                    max_records: int | None = None) -> Outcome:
    import asyncio

    from inferplane.ledger import postgres as pg

    assert source.dsn is not None
    t = pg.Tables(source.schema, source.prefix)

    async def migrate() -> None:  # a version-2 ledger gets the anchors' table (migration 3)
        async with await psycopg.AsyncConnection.connect(source.dsn or "",
                                                         connect_timeout=5) as aconn:
            await pg.migrate(aconn, t, pg.SCHEMA_VERSION)

    try:  # the plan first: a run that prunes nothing changes nothing (no migration)
        with psycopg.connect(source.dsn, connect_timeout=5, autocommit=True) as conn:
            store = _Store(conn, "%s", t.decisions, t.checkpoints, t.anchors)
            out = plan(store, rep, before, shards, max_records)
            if dry_run or not out.plans:
                return out
            asyncio.run(migrate())
            for p in out.plans:
                a = _anchor(signer, p, before, now)
                with _so_far(out), conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                                 (f"inferplane-ledger-prune:{source.schema}.{source.prefix}"
                                  f":{p.shard}",))
                    store.prune(p, a)
                out.anchors.append(a)
            return out
    except psycopg.Error as exc:
        raise SourceError(f"{source.name}: cannot prune: {first_line(exc)}") from None


@contextlib.contextmanager
def _so_far(out: Outcome) -> Iterator[None]:
    """A shard's prune that fails says which shards before it were pruned (and stay so)."""
    try:
        yield
    except (SourceError, sqlite3.Error, psycopg.Error) as exc:
        if not out.anchors:
            raise
        done = ", ".join(f"{a.shard} up to #{a.first_seq - 1}" for a in out.anchors)
        # on one line: the callers keep only an error's first line (a server's error has its
        # DETAIL, HINT and CONTEXT on the next ones), and the shards pruned must not be lost
        raise type(exc)(f"{first_line(exc)} (pruned before it: {done})") from None


def _anchor(signer: Signer, p: ShardPlan, before: float, now: float | None) -> PruneAnchor:
    return signer.sign_anchor(p.shard, p.cut + 1, p.cut_hash, before,
                              time.time() if now is None else now)
