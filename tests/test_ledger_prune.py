"""Ledger retention: ``inferplane ledger-prune`` and the signed prune anchor verify starts at.

The SQLite ledger of `tests.test_ledger_chain` (12 records made at t = 1000 … 1011, a checkpoint
at every 4th) is pruned, then tampered with the way someone with write access to the file would
(deleting past the anchor, deleting or editing the anchor, forging one with another key), and
verify must still fail, saying what is wrong. The PostgreSQL side is in test_ledger_postgres.py.
"""

from __future__ import annotations

import base64
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from inferplane.cli import app
from inferplane.ledger import prune as prune_mod
from inferplane.ledger.chain import Signer, public_pem
from inferplane.ledger.prune import prune
from inferplane.ledger.query import Query
from inferplane.ledger.sqlite import SqliteLedger
from inferplane.ledger.tools import Source, SourceError, describe, verify
from inferplane.ledger.verify import verify_sqlite
from inferplane.placement.framework import Decision
from tests.test_ledger import _ok, _with_id
from tests.test_ledger import decision as decision  # the fixture
from tests.test_ledger_chain import EVERY, SIGNER, N, _copy, _signer, _write

# records d-0 … d-6 are made before 1006.5; d-7 (#8) is the first after: the last signed
# checkpoint before it is #4, so #1..#4 go and #5..#7 (made before too) stay
T = 1006.5


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, decision: Decision) -> Path:
    path = tmp_path_factory.mktemp("prune") / "base.db"
    _write(path, decision)
    return path


@pytest.fixture
def pruned(base: Path, tmp_path: Path) -> Path:
    path = _copy(base, tmp_path, "pruned.db")
    out = prune(Source(sqlite_path=str(path)), SIGNER, T, checkpoint_every=EVERY, now=2000.0)
    assert [(p.shard, p.first, p.cut) for p in out.plans] == [("main", 1, 4)]
    return path


def _stored(path: Path) -> list[int]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [r[0] for r in conn.execute("SELECT chain_seq FROM decisions ORDER BY chain_seq")]


def _version(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("SELECT version FROM schema_version").fetchone()[0])


def _sql(path: Path, *statements: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        for st in statements:
            conn.execute(st)


def test_prune_deletes_whole_intervals_and_verify_starts_at_the_signed_anchor(
    pruned: Path,
) -> None:
    assert _stored(pruned) == list(range(5, N + 1))
    rep = verify_sqlite(str(pruned), SIGNER.public, EVERY)
    assert rep.ok, rep.problem
    assert rep.first == {"main": 5} and rep.shards == {"main": N} and rep.records == N - 4
    assert rep.anchors == rep.anchors_checked == 1 and rep.pruned["main"].first_seq == 5
    # the checkpoints of pruned records went with them (#4's hash is the anchor's prev_hash)
    assert rep.checkpoints == rep.checkpoints_checked == 2
    with contextlib.closing(sqlite3.connect(pruned)) as conn:
        assert [r[0] for r in conn.execute("SELECT seq FROM checkpoints")] == [8, 12]
        (prev,) = conn.execute("SELECT prev_hash FROM prune_anchors").fetchone()
        assert conn.execute("SELECT prev_hash FROM decisions WHERE chain_seq = 5").fetchone() \
            == (prev,)


def test_prune_is_idempotent(pruned: Path) -> None:
    again = prune(Source(sqlite_path=str(pruned)), SIGNER, T, checkpoint_every=EVERY)
    assert again.report.ok and again.plans == [] and not again.nothing_before
    assert "no signed checkpoint" in again.idle["main"]
    assert _stored(pruned) == list(range(5, N + 1))
    with contextlib.closing(sqlite3.connect(pruned)) as conn:
        assert conn.execute("SELECT count(*) FROM prune_anchors").fetchone() == (1,)


def test_a_later_prune_moves_the_start_and_keeps_the_earlier_anchor(pruned: Path) -> None:
    out = prune(Source(sqlite_path=str(pruned)), SIGNER, 1010.5, checkpoint_every=EVERY)
    assert [(p.first, p.cut) for p in out.plans] == [(5, 8)]
    rep = verify_sqlite(str(pruned), SIGNER.public, EVERY)
    assert rep.ok and rep.first == {"main": 9} and rep.anchors == 2, rep.problem
    # the earlier anchor deleted: harmless (the latest one starts the chain)
    _sql(pruned, "DELETE FROM prune_anchors WHERE first_seq = 5")
    assert verify_sqlite(str(pruned), SIGNER.public, EVERY).ok


def test_max_records_prunes_in_steps_each_with_its_own_anchor(
    base: Path, tmp_path: Path, key: Path
) -> None:
    """#1..#8 (before 1010.5) in steps of at most 5 records: whole intervals of 4, so #1..#4
    then #5..#8, each its own transaction and anchor; a step is never less than an interval."""
    path = _copy(base, tmp_path, "steps.db")
    source = Source(sqlite_path=str(path))
    out = prune(source, SIGNER, 1010.5, checkpoint_every=EVERY, max_records=5)
    assert [(p.first, p.cut) for p in out.plans] == [(1, 4), (5, 8)]
    assert [a.first_seq for a in out.anchors] == [5, 9] and _stored(path) == [9, 10, 11, 12]
    rep = verify_sqlite(str(path), SIGNER.public, EVERY)
    assert rep.ok and rep.first == {"main": 9} and rep.anchors == 2, rep.problem
    whole = _copy(base, tmp_path, "whole.db")
    one = prune(Source(sqlite_path=str(whole)), SIGNER, 1010.5, checkpoint_every=EVERY,
                max_records=8)
    assert [(p.first, p.cut) for p in one.plans] == [(1, 8)]
    small = _copy(base, tmp_path, "small.db")
    done = CliRunner().invoke(app, ["ledger-prune", "--ledger", str(small), "--key", str(key),
                                    "--checkpoint-every", str(EVERY), "--before", "1010.5",
                                    "--max-records", "1"])
    assert done.exit_code == 0, done.output
    assert "pruned shard main in 2 steps (--max-records 1: a transaction and an anchor " \
        "each): records #1..#8 (8); kept #9..#12" in done.output
    assert "step 1 of 2: records #1..#4 (4), anchor at #5 signed" in done.output
    assert "step 2 of 2: records #5..#8 (4), anchor at #9 signed" in done.output
    # a dry run says the same, as steps of one prune: no step's line reads as the whole
    dry_path = _copy(base, tmp_path, "dry.db")
    dry = CliRunner().invoke(app, ["ledger-prune", "--ledger", str(dry_path), "--key",
                                   str(key), "--checkpoint-every", str(EVERY), "--before",
                                   "1010.5", "--max-records", "1", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert dry.output.splitlines() == [
        "would prune shard main in 2 steps (--max-records 1: a transaction and an anchor "
        "each): records #1..#8 (8); kept #9..#12; 3 later records made before the cut-off "
        "stay until a checkpoint follows them",
        "  step 1 of 2: records #1..#4 (4), anchor at #5",
        "  step 2 of 2: records #5..#8 (4), anchor at #9",
    ], dry.output
    assert _stored(dry_path) == list(range(1, N + 1))


def test_an_earlier_anchor_signed_by_a_replaced_key_is_history(pruned: Path) -> None:
    """Key rotation: only each shard's latest anchor starts its chain, so only it must verify
    with the pinned key; an earlier one signed by the key it replaced does not fail the ledger
    (nobody without the pinned key can add a later anchor, nor one tied with the latest)."""
    prune(Source(sqlite_path=str(pruned)), SIGNER, 1010.5, checkpoint_every=EVERY)  # #5..#8
    old = _signer()
    with contextlib.closing(sqlite3.connect(pruned)) as conn, conn:
        (prev,) = conn.execute("SELECT prev_hash FROM prune_anchors WHERE first_seq = 5"
                               ).fetchone()
        a = old.sign_anchor("main", 5, prev, T, 2000.0)
        conn.execute("UPDATE prune_anchors SET key_id = ?, signature = ? WHERE first_seq = 5",
                     (a.key_id, a.signature))
    rep = verify_sqlite(str(pruned), SIGNER.public, EVERY)
    assert rep.ok and rep.first == {"main": 9}, rep.problem
    assert (rep.anchors, rep.anchors_latest, rep.anchors_checked) == (2, 1, 1)
    assert any(line.startswith("prune anchors: 1 of 1 signatures verified (1 earlier kept as "
                               "history, unchecked); main starts at #9")
               for line in describe(rep, Source(sqlite_path=str(pruned))))
    # the same key's anchor tied with the latest one (#9) is checked: refused
    with contextlib.closing(sqlite3.connect(pruned)) as conn, conn:
        (prev,) = conn.execute("SELECT prev_hash FROM prune_anchors WHERE first_seq = 9"
                               ).fetchone()
        b = old.sign_anchor("main", 9, prev, 1010.5, 3000.0)
        conn.execute("INSERT INTO prune_anchors (shard, first_seq, prev_hash, before_unix, "
                     "at_unix, key_id, signature) VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (b.shard, b.first_seq, b.prev_hash, b.before_unix, b.at_unix, b.key_id,
                      b.signature))
    rep = verify_sqlite(str(pruned), SIGNER.public, EVERY)
    assert not rep.ok and f"is signed by key {old.key_id}, not the pinned key" \
        in (rep.problem or "")


# -- tampering with a pruned ledger --------------------------------------------------------


def test_deleting_records_after_the_anchor_is_caught(pruned: Path) -> None:
    _sql(pruned, "DELETE FROM decisions WHERE chain_seq = 5")
    rep = verify_sqlite(str(pruned), SIGNER.public, EVERY)
    assert not rep.ok and rep.bad_seq == 6
    assert "(#5) are missing (deleted): the shard's latest prune anchor starts its chain at #5" \
        in (rep.problem or "")


def test_deleting_the_anchor_is_caught(pruned: Path) -> None:
    _sql(pruned, "DELETE FROM prune_anchors")
    rep = verify_sqlite(str(pruned), SIGNER.public, EVERY)
    assert not rep.ok and rep.bad_seq == 5
    assert "(#1..#4) are missing (deleted) and no prune anchor accounts for them" \
        in (rep.problem or "")


def test_deleting_a_later_prunes_anchor_is_caught(pruned: Path) -> None:
    prune(Source(sqlite_path=str(pruned)), SIGNER, 1010.5, checkpoint_every=EVERY)
    _sql(pruned, "DELETE FROM prune_anchors WHERE first_seq = 9")
    rep = verify_sqlite(str(pruned), SIGNER.public, EVERY)
    assert not rep.ok and rep.bad_seq == 9
    assert "#5..#8" in (rep.problem or "") and "a later prune's anchor was deleted" \
        in (rep.problem or "")


def test_an_anchor_with_another_prev_hash_is_caught_with_or_without_the_key(
    pruned: Path,
) -> None:
    _sql(pruned, "UPDATE prune_anchors SET prev_hash = '" + "ab" * 32 + "'")
    keyed = verify_sqlite(str(pruned), SIGNER.public, EVERY)
    assert not keyed.ok and "prune anchor at #5 has a signature that is not valid" \
        in (keyed.problem or "")
    bare = verify_sqlite(str(pruned), None, EVERY)
    assert not bare.ok and bare.bad_seq == 5
    assert "its previous hash is not the one its prune anchor names" in (bare.problem or "")


def test_an_anchor_signed_by_another_key_is_caught(base: Path, tmp_path: Path) -> None:
    """A forger deletes the oldest records and signs an anchor with a key of their own."""
    path = _copy(base, tmp_path, "forged.db")
    forger = _signer()
    # prune verifies with the forger's own key first, which signed no checkpoint: refused
    refused = prune(Source(sqlite_path=str(path)), forger, T, checkpoint_every=EVERY)
    assert not refused.report.ok and _stored(path) == list(range(1, N + 1))
    # so the forger writes the anchor by hand
    _write_anchor_by_hand(path, forger)
    rep = verify_sqlite(str(path), SIGNER.public, EVERY)
    assert not rep.ok and f"is signed by key {forger.key_id}, not the pinned key" \
        in (rep.problem or "")
    # a forged signature under the right key id
    _sql(path, f"UPDATE prune_anchors SET key_id = '{SIGNER.key_id}', signature = '"
         + base64.b64encode(b"x" * 64).decode() + "'")
    rep = verify_sqlite(str(path), SIGNER.public, EVERY)
    assert not rep.ok and "signature that is not valid" in (rep.problem or "")


def _write_anchor_by_hand(path: Path, signer: Signer) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        (h,) = conn.execute("SELECT chain_hash FROM decisions WHERE chain_seq = 4").fetchone()
        a = signer.sign_anchor("main", 5, h, T, 2000.0)
        conn.execute("CREATE TABLE IF NOT EXISTS prune_anchors (id INTEGER PRIMARY KEY, shard "
                     "TEXT, first_seq INTEGER, prev_hash TEXT, before_unix REAL, at_unix REAL, "
                     "key_id TEXT, signature TEXT)")
        conn.execute("INSERT INTO prune_anchors (shard, first_seq, prev_hash, before_unix, "
                     "at_unix, key_id, signature) VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (a.shard, a.first_seq, a.prev_hash, a.before_unix, a.at_unix, a.key_id,
                      a.signature))
        conn.execute("DELETE FROM decisions WHERE chain_seq <= 4")
        conn.execute("DELETE FROM checkpoints WHERE seq <= 4")


def test_records_put_back_before_the_anchor_are_caught(base: Path, tmp_path: Path) -> None:
    path = _copy(base, tmp_path, "back.db")
    _write_anchor_by_hand(path, SIGNER)
    assert verify_sqlite(str(path), SIGNER.public, EVERY).ok
    _sql(path, f"ATTACH '{base}' AS old",
         "INSERT INTO decisions SELECT * FROM old.decisions WHERE chain_seq = 4")
    rep = verify_sqlite(str(path), SIGNER.public, EVERY)
    assert not rep.ok and "stored although the shard's prune anchor starts its chain at #5" \
        in (rep.problem or "")


def test_without_a_key_verify_says_what_it_cannot_check(pruned: Path) -> None:
    rep = verify_sqlite(str(pruned), None, EVERY)
    assert rep.ok, rep.problem
    assert any("records #1..#4 were pruned" in w and "signature is not checked" in w
               and "a deletion by anyone would look the same" in w for w in rep.warnings)


# -- the whole shard, writers, atomicity -------------------------------------------------------


def test_a_whole_shard_pruned_to_its_head_takes_new_records_and_stray_checkpoints(
    base: Path, tmp_path: Path, decision: Decision
) -> None:
    path = _copy(base, tmp_path, "whole.db")
    out = prune(Source(sqlite_path=str(path)), SIGNER, 5000.0, checkpoint_every=EVERY)
    assert [(p.first, p.cut, p.last) for p in out.plans] == [(1, N, N)]
    assert _stored(path) == []
    rep = verify_sqlite(str(path), SIGNER.public, EVERY)
    assert rep.ok and rep.records == 0 and rep.first == {"main": N + 1}, rep.problem
    # a writer that signed the head just as it was pruned (its checkpoint names #12)
    cp = SIGNER.sign("main", N, rep.last_hash["main"], 1.0)
    _sql(path, "INSERT INTO checkpoints (shard, seq, chain_hash, at_unix, key_id, signature) "
         f"VALUES ('main', {N}, '{cp.chain_hash}', 1.0, '{cp.key_id}', '{cp.signature}')")
    rep = verify_sqlite(str(path), SIGNER.public, EVERY)
    assert rep.ok and rep.checkpoints_pruned == 1, rep.problem
    # the shard's writer carries on from its head, after the anchor
    led = SqliteLedger(path, batch_size=5, signer=SIGNER, checkpoint_every=EVERY)
    led.record(_with_id(decision, "d-new"), _ok(decision), 6000.0)
    led.close_sync()
    rep = verify_sqlite(str(path), SIGNER.public, EVERY)
    assert rep.ok and rep.first == {"main": N + 1} and rep.shards == {"main": N + 1}
    # deleting that record is still caught by the head
    _sql(path, f"DELETE FROM decisions WHERE chain_seq = {N + 1}")
    rep = verify_sqlite(str(path), SIGNER.public, EVERY)
    assert not rep.ok and "were deleted" in (rep.problem or "")


def test_a_writer_appending_during_the_prune(
    base: Path, tmp_path: Path, decision: Decision
) -> None:
    """The writer's records after the verified head stay, chained after them."""
    path = _copy(base, tmp_path, "busy.db")
    led = SqliteLedger(path, batch_size=2, signer=SIGNER, checkpoint_every=EVERY)
    real = prune_mod.plan

    def writer_commits_meanwhile(*args: object) -> prune_mod.Outcome:
        out = real(*args)  # type: ignore[arg-type]
        # between the verify and the prune's transaction, a batch commits (at #13, #14)
        for i in range(2):
            led.record(_with_id(decision, f"w-{i}"), _ok(decision), 3000.0 + i)
        assert led.flush()
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prune_mod, "plan", writer_commits_meanwhile)
        out = prune(Source(sqlite_path=str(path)), SIGNER, T, checkpoint_every=EVERY)
    assert out.plans[0].last == N
    for i in range(2, 6):
        led.record(_with_id(decision, f"w-{i}"), _ok(decision), 3000.0 + i)
    led.close_sync()
    rep = verify_sqlite(str(path), SIGNER.public, EVERY)
    assert rep.ok and rep.first == {"main": 5} and rep.shards == {"main": N + 6}, rep.problem


def test_a_prune_that_fails_midway_leaves_the_ledger_as_it_was(
    base: Path, tmp_path: Path
) -> None:
    path = _copy(base, tmp_path, "crash.db")
    real = prune_mod._Store.prune

    def crash_after_the_deletes(self: prune_mod._Store, p: prune_mod.ShardPlan,
                                a: object) -> None:
        real(self, p, a)  # type: ignore[arg-type]
        raise sqlite3.OperationalError("disk I/O error")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prune_mod._Store, "prune", crash_after_the_deletes)
        with pytest.raises(SourceError, match="cannot prune: disk I/O error"):
            prune(Source(sqlite_path=str(path)), SIGNER, T, checkpoint_every=EVERY)
    assert _stored(path) == list(range(1, N + 1))
    rep = verify_sqlite(str(path), SIGNER.public, EVERY)
    assert rep.ok and rep.anchors == 0 and rep.checkpoints == 3, rep.problem


def test_a_database_error_without_text_is_named_by_its_type(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A driver error with no message is a `SourceError` naming its type, not an IndexError
    from taking the first of no lines."""
    import psycopg

    from inferplane.ledger import postgres as pg

    def refuse(dsn: str) -> None:
        raise psycopg.OperationalError()

    monkeypatch.setattr(pg, "connect_sync", refuse)
    with pytest.raises(SourceError, match=r"decisions: OperationalError$"):
        verify(Source(dsn="postgresql://nowhere/x"), None)


def test_a_prune_of_a_ledger_changed_since_its_verify_is_refused(
    base: Path, tmp_path: Path
) -> None:
    """Two prunes at once: the second one's transaction finds the shard moved on."""
    path = _copy(base, tmp_path, "race.db")
    source = Source(sqlite_path=str(path))
    stale = verify(source, SIGNER.public, EVERY)
    prune(source, SIGNER, T, checkpoint_every=EVERY)  # the other prune: #1..#4
    with pytest.raises(SourceError, match=r"changed since it was verified .*another prune"):
        prune_mod._prune_sqlite(source, SIGNER, stale, 1010.5, ["main"], False, None)
    rep = verify_sqlite(str(path), SIGNER.public, EVERY)
    assert rep.ok and rep.first == {"main": 5} and rep.anchors == 1, rep.problem


@pytest.mark.parametrize(("change", "says"), [
    # the cut record (#4) edited: its hash is no longer the one the anchor would sign
    ("UPDATE decisions SET chain_hash = 'x' WHERE chain_seq = 4", r"\(record #4\)"),
    # a record before the cut deleted: the DELETE removes 3 records, not the 4 verified
    ("DELETE FROM decisions WHERE chain_seq = 2", r"\(3 records up to #4, 4 verified\)"),
])
def test_a_prune_rechecks_the_cut_and_the_count_in_its_transaction(
    base: Path, tmp_path: Path, change: str, says: str
) -> None:
    path = _copy(base, tmp_path, "moved.db")
    source = Source(sqlite_path=str(path))
    stale = verify(source, SIGNER.public, EVERY)
    _sql(path, change)
    before = _stored(path)
    with pytest.raises(SourceError, match=r"changed since it was verified " + says):
        prune_mod._prune_sqlite(source, SIGNER, stale, T, ["main"], False, None)
    assert _stored(path) == before  # rolled back: nothing deleted, no anchor
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM prune_anchors").fetchone() == (0,)


# -- schema 2 files ------------------------------------------------------------------------


def _as_version_2(path: Path) -> None:
    _sql(path, "DROP TABLE IF EXISTS prune_anchors", "UPDATE schema_version SET version = 2")


def test_a_version_2_file_is_read_as_it_is_and_migrated_by_the_first_prune(
    base: Path, tmp_path: Path, decision: Decision
) -> None:
    path = _copy(base, tmp_path, "v2.db")
    _as_version_2(path)
    assert verify_sqlite(str(path), SIGNER.public, EVERY).ok  # read-only: not migrated
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (2,)
    dry = prune(Source(sqlite_path=str(path)), SIGNER, T, dry_run=True, checkpoint_every=EVERY)
    assert [(p.first, p.cut) for p in dry.plans] == [(1, 4)] and dry.anchors == []
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (2,)
    prune(Source(sqlite_path=str(path)), SIGNER, T, checkpoint_every=EVERY)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (3,)
    assert verify_sqlite(str(path), SIGNER.public, EVERY).first == {"main": 5}
    # a gateway keeps a version-2 file at 2 (an older inferplane still opens it), makes new
    # files at 2, and writes a version-3 one as it is
    other = _copy(base, tmp_path, "v2-gw.db")
    _as_version_2(other)
    fresh = tmp_path / "fresh.db"
    for f in (other, fresh, path):
        led = SqliteLedger(f, signer=SIGNER, checkpoint_every=EVERY)
        led.record(_with_id(decision, "d-new"), _ok(decision), 5000.0)
        led.close_sync()
        assert verify_sqlite(str(f), SIGNER.public, EVERY).ok
    for f, version in ((other, 2), (fresh, 2), (path, 3)):
        with contextlib.closing(sqlite3.connect(f)) as conn:
            assert conn.execute("SELECT version FROM schema_version").fetchone() == (version,)


# -- the command, listing and export -------------------------------------------------------


@pytest.fixture
def key(tmp_path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization as ser

    k = tmp_path / "ledger.key"
    k.write_bytes(SIGNER.private.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                               ser.NoEncryption()))
    return k


def test_the_command(base: Path, tmp_path: Path, key: Path) -> None:
    runner = CliRunner()
    path = _copy(base, tmp_path, "cli.db")
    args = ["ledger-prune", "--ledger", str(path), "--checkpoint-every", str(EVERY)]
    nokey = runner.invoke(app, [*args, "--before", str(T)])
    assert nokey.exit_code == 2 and "no signing key" in nokey.output
    withkey = [*args, "--key", str(key)]
    future = runner.invoke(app, [*withkey, "--before", "2999-01-01"])
    assert future.exit_code == 2 and "is in the future" in future.output
    early = runner.invoke(app, [*withkey, "--before", "999"])
    assert early.exit_code == 2 and "nothing in" in early.output and "made before 999" \
        in early.output
    # a run that prunes nothing changes nothing: the version-2 file is not migrated (an older
    # gateway still opens it); nor is it by a run whose records before T have no signed
    # checkpoint after them yet (#1, #2 before 1001.5; the first checkpoint is #4)
    assert _version(path) == 2
    idle = runner.invoke(app, [*withkey, "--before", "1001.5"])
    assert idle.exit_code == 0 and "no signed checkpoint follows them" in idle.output, idle.output
    assert _version(path) == 2 and _stored(path) == list(range(1, N + 1))
    dry = runner.invoke(app, [*withkey, "--before", str(T), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would prune shard main: records #1..#4 (4), anchor at #5; kept #5..#12; 3 later " \
        "records made before the cut-off stay" in dry.output
    assert _stored(path) == list(range(1, N + 1))
    done = runner.invoke(app, [*withkey, "--before", "1970-01-01T00:16:46.5"])
    assert done.exit_code == 0, done.output
    assert f"pruned shard main: records #1..#4 (4), anchor at #5 signed (key {SIGNER.key_id})" \
        in done.output
    again = runner.invoke(app, [*withkey, "--before", str(T)])
    assert again.exit_code == 0 and "shard main: nothing to prune" in again.output
    pub = tmp_path / "pub.pem"
    pub.write_bytes(public_pem(SIGNER.public))
    ok = runner.invoke(app, ["verify", "--ledger", str(path), "--public-key", str(pub),
                             "--checkpoint-every", str(EVERY)])
    assert ok.exit_code == 0, ok.output
    assert "8 records intact in 1 chain(s): main (#5..#12; #1..#4 pruned)" in ok.output
    assert "prune anchors: 1 of 1 signatures verified; main starts at #5 (pruned " in ok.output
    bare = runner.invoke(app, ["verify", "--ledger", str(path)])
    assert bare.exit_code == 0 and "signature is not checked" in bare.output
    # a ledger that does not verify is never pruned
    _sql(path, "UPDATE decisions SET tenant = 'globex' WHERE chain_seq = 9")
    refused = runner.invoke(app, [*withkey, "--before", "1010.5"])
    assert refused.exit_code == 1, refused.output  # as verify and ledger-sign-heads
    assert "TAMPERED" in refused.output and "nothing pruned: the ledger does not verify" \
        in refused.output
    assert _stored(path) == list(range(5, N + 1))


async def test_listing_export_and_explain_on_a_pruned_ledger(
    pruned: Path, tmp_path: Path
) -> None:
    led = SqliteLedger(pruned)
    try:
        page = await led.query(Query(tenant=None, limit=100))
        assert [it["record"]["decision_id"] for it in page.items] == [
            f"d-{i}" for i in range(4, N)]
        assert await led.lookup("d-0") is None and await led.lookup("d-4") is not None
    finally:
        led.close_sync()
    runner = CliRunner()
    out = tmp_path / "x.ndjson"
    exp = runner.invoke(app, ["export", "--ledger", str(pruned), "-o", str(out)])
    assert exp.exit_code == 0, exp.output
    assert "exported 8 records" in exp.output
    assert "shard main was pruned: its chain starts at #5, after the prune anchor (pruned " \
        in exp.output and f"key {SIGNER.key_id}" in exp.output
    assert len(out.read_bytes().splitlines()) == 1 + N - 4  # the anchor, then the records
    gone = runner.invoke(app, ["explain", "d-0", "--ledger", str(pruned)])
    assert gone.exit_code == 1 and "no decision 'd-0'" in gone.output


def test_shards_are_pruned_one_transaction_each(tmp_path: Path, decision: Decision) -> None:
    """Two shards: each prunes in its own transaction; one that fails says which went before
    it, and leaves its own records whole."""
    path = tmp_path / "two.db"
    for shard in ("a", "b"):
        led = SqliteLedger(path, shard=shard, signer=SIGNER, checkpoint_every=EVERY)
        for i in range(N):
            led.record(_with_id(decision, f"{shard}-{i}"), _ok(decision), 1000.0 + i)
        led.close_sync()
    real = prune_mod._Store.prune

    def fail_on_b(self: prune_mod._Store, p: prune_mod.ShardPlan, a: object) -> None:
        real(self, p, a)  # type: ignore[arg-type]
        if p.shard == "b":
            raise sqlite3.OperationalError("disk full")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prune_mod._Store, "prune", fail_on_b)
        with pytest.raises(SourceError, match=r"disk full \(pruned before it: a up to #4\)"):
            prune(Source(sqlite_path=str(path)), SIGNER, T, checkpoint_every=EVERY)
    rep = verify_sqlite(str(path), SIGNER.public, EVERY)
    assert rep.ok and rep.first == {"a": 5, "b": 1}, rep.problem
    out = prune(Source(sqlite_path=str(path)), SIGNER, T, ["b"], checkpoint_every=EVERY)
    assert [(p.shard, p.cut) for p in out.plans] == [("b", 4)]
    assert verify_sqlite(str(path), SIGNER.public, EVERY).first == {"a": 5, "b": 5}


def test_a_prune_across_a_signing_key_change(base: Path, tmp_path: Path, key: Path,
                                             decision: Decision) -> None:
    """Records #1..#12 signed by the old key (SIGNER), #13..#16 by the new one after a key
    change. With the new key alone the old checkpoints do not verify, so nothing is pruned;
    with the old key's public half as --previous-key (a keyring) the cut may be an
    old-signed checkpoint, the anchor is signed by the new key, and verify with both keys
    accepts the result."""
    from cryptography.hazmat.primitives import serialization as ser

    path = _copy(base, tmp_path, "rotated.db")
    new = _signer()
    led = SqliteLedger(path, signer=new, checkpoint_every=EVERY)
    for i in range(N, N + 4):
        led.record(_with_id(decision, f"d-{i}"), _ok(decision), 1000.0 + i)
    led.close_sync()
    new_key = tmp_path / "new.key"
    new_key.write_bytes(new.private.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                                  ser.NoEncryption()))
    old_pub, new_pub = tmp_path / "old.pub", tmp_path / "new.pub"
    old_pub.write_bytes(public_pem(SIGNER.public))
    new_pub.write_bytes(public_pem(new.public))
    runner = CliRunner()
    args = ["ledger-prune", "--ledger", str(path), "--key", str(new_key), "--checkpoint-every",
            str(EVERY), "--before", "1010.5"]
    alone = runner.invoke(app, args)
    assert alone.exit_code == 1, alone.output
    assert f"signed by key {SIGNER.key_id}, not the pinned key {new.key_id}" in alone.output
    assert _stored(path) == list(range(1, N + 5))
    done = runner.invoke(app, [*args, "--previous-key", str(old_pub)])
    assert done.exit_code == 0, done.output
    assert f"pruned shard main: records #1..#8 (8), anchor at #9 signed (key {new.key_id})" \
        in done.output
    verify_args = ["verify", "--ledger", str(path), "--checkpoint-every", str(EVERY)]
    both = runner.invoke(app, [*verify_args, "--public-key", str(new_pub), "--public-key",
                               str(old_pub)])
    assert both.exit_code == 0, both.output
    assert f"with the keyring {new.key_id}, {SIGNER.key_id}" in both.output
    assert "main (#9..#16; #1..#8 pruned)" in both.output
    # the kept records #9..#12 are still signed by the old key only
    only_new = runner.invoke(app, [*verify_args, "--public-key", str(new_pub)])
    assert only_new.exit_code == 1 and f"signed by key {SIGNER.key_id}" in only_new.output
    # a checkpoint by a key in no one's keyring is still refused, naming the keyring
    other = _signer()
    rep = verify_sqlite(str(path), [other.public, SIGNER.public], EVERY)
    assert not rep.ok and f"not any pinned key ({other.key_id}, {SIGNER.key_id})" \
        in (rep.problem or ""), rep.problem


def test_an_earlier_key_in_a_keyring_signs_nothing_after_the_key_change(
    pruned: Path, tmp_path: Path, decision: Decision
) -> None:
    """A keyring (current key first) trusts an earlier key only where the current key vouches
    for it: not a shard's latest prune anchor, not a checkpoint after the current key's latest
    one of the shard. ``ledger-sign-heads --previous-key`` is the change: it signs the heads
    and re-signs the latest anchor with the new key. Then whoever holds the old (leaked) key
    can neither forge a checkpoint over a new tail nor prune the history with a new anchor."""
    from cryptography.hazmat.primitives import serialization as ser

    path = _copy(pruned, tmp_path, "ring.db")  # #5..#12, anchor at #5 and checkpoints: old key
    new = _signer()
    new_key = tmp_path / "new.key"
    new_key.write_bytes(new.private.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                                  ser.NoEncryption()))
    old_pub = tmp_path / "old.pub"
    old_pub.write_bytes(public_pem(SIGNER.public))
    ring = [new.public, SIGNER.public]
    before = verify_sqlite(str(path), ring, EVERY)
    assert not before.ok and f"is signed by the earlier key {SIGNER.key_id}, not the current " \
        f"key {new.key_id}" in (before.problem or ""), before.problem
    runner = CliRunner()
    res = runner.invoke(app, ["ledger-sign-heads", "--ledger", str(path), "--key", str(new_key),
                              "--previous-key", str(old_pub)])
    assert res.exit_code == 0, res.output
    assert f"signed main at #{N} (key {new.key_id})" in res.output, res.output
    assert f"re-signed 1 latest prune anchor(s) with key {new.key_id}: main at #5" in res.output
    rep = verify_sqlite(str(path), ring, EVERY)
    assert rep.ok and rep.current_signed == {"main": N}, rep.problem
    # the writers go on with the new key
    led = SqliteLedger(path, signer=new, checkpoint_every=EVERY)
    for i in range(N, N + 4):
        led.record(_with_id(decision, f"d-{i}"), _ok(decision), 1000.0 + i)
    led.close_sync()
    rep = verify_sqlite(str(path), ring, EVERY)
    assert rep.ok and rep.current_signed["main"] == N + 4, rep.problem
    # the old key's holder signs a checkpoint over the new tail: refused
    forged = _copy(path, tmp_path, "forged-cp.db")
    cp = SIGNER.sign("main", N + 4, rep.last_hash["main"], 3000.0)
    _sql(forged, f"DELETE FROM checkpoints WHERE seq = {N + 4}",
         "INSERT INTO checkpoints (shard, seq, chain_hash, at_unix, key_id, signature) "
         f"VALUES ('main', {N + 4}, '{cp.chain_hash}', 3000.0, '{cp.key_id}', "
         f"'{cp.signature}')")
    bad = verify_sqlite(str(forged), ring, EVERY)
    assert not bad.ok and f"signed by the earlier key {SIGNER.key_id} after the current key " \
        f"{new.key_id}'s latest checkpoint of the shard (#{N})" in (bad.problem or ""), \
        bad.problem
    # an old-key checkpoint below a current-key one is harmless (the latter's chain hash
    # commits to it): a writer still on the old key during a rolling restart, say
    late = _copy(path, tmp_path, "late.db")
    with contextlib.closing(sqlite3.connect(late)) as conn:
        (h14,) = conn.execute("SELECT chain_hash FROM decisions WHERE chain_seq = 14").fetchone()
    c14 = SIGNER.sign("main", 14, h14, 3000.0)
    _sql(late, "INSERT INTO checkpoints (shard, seq, chain_hash, at_unix, key_id, signature) "
         f"VALUES ('main', 14, '{h14}', 3000.0, '{c14.key_id}', '{c14.signature}')")
    assert verify_sqlite(str(late), ring, EVERY).ok
    # ... or prunes #5..#8 with an anchor it signs: refused
    cut = _copy(path, tmp_path, "forged-anchor.db")
    with contextlib.closing(sqlite3.connect(cut)) as conn, conn:
        (prev,) = conn.execute("SELECT prev_hash FROM decisions WHERE chain_seq = 9").fetchone()
        a = SIGNER.sign_anchor("main", 9, prev, 1008.5, 3000.0)
        conn.execute("INSERT INTO prune_anchors (shard, first_seq, prev_hash, before_unix, "
                     "at_unix, key_id, signature) VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (a.shard, a.first_seq, a.prev_hash, a.before_unix, a.at_unix, a.key_id,
                      a.signature))
        conn.execute("DELETE FROM decisions WHERE chain_seq <= 8")
    bad = verify_sqlite(str(cut), ring, EVERY)
    assert not bad.ok and "must be signed by the current key" in (bad.problem or ""), \
        bad.problem
    # the key change itself (sign-heads with --previous-key) accepts either key anywhere
    assert verify_sqlite(str(cut), ring, EVERY, rotation=True).ok


# -- an export carries the anchor: verified from the file alone ----------------------------


def _export(runner: CliRunner, ledger: Path, out: Path, *extra: str) -> None:
    res = runner.invoke(app, ["export", "--ledger", str(ledger), "-o", str(out), *extra])
    assert res.exit_code == 0, res.output


def test_an_export_of_a_pruned_ledger_verifies_from_the_file(
    base: Path, pruned: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    pub = tmp_path / "pub.pem"
    pub.write_bytes(public_pem(SIGNER.public))
    out = tmp_path / "x.ndjson"
    _export(runner, pruned, out)
    lines = out.read_bytes().splitlines(keepends=True)
    first = orjson.loads(lines[0])
    assert first["schema"] == "inferplane.prune/1" and first["first_seq"] == 5
    assert first["key_id"] == SIGNER.key_id and orjson.loads(lines[1])["seq"] == 5
    args = ["verify", "--export", str(out), "--public-key", str(pub)]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert "8 records intact in 1 chain(s): main (#5..#12; #1..#4 pruned)" in ok.output
    assert "prune anchors: 1 of 1 signatures verified; main starts at #5" in ok.output
    bare = runner.invoke(app, ["verify", "--export", str(out)])
    assert bare.exit_code == 0 and "signature was not checked" in bare.output, bare.output
    # an export of a ledger never pruned starts at #1 and carries no anchor
    whole = tmp_path / "whole.ndjson"
    _export(runner, base, whole)
    res = runner.invoke(app, ["verify", "--export", str(whole), "--public-key", str(pub)])
    assert res.exit_code == 0 and "main (#1..#12)" in res.output, res.output

    def tampered(name: str, new_lines: list[bytes], *extra: str) -> str:
        f = tmp_path / name
        f.write_bytes(b"".join(new_lines))
        res = runner.invoke(app, ["verify", "--export", str(f), *extra])
        assert res.exit_code == 1, res.output
        return res.output

    assert "#1..#4 are missing and no prune anchor accounts for them" in tampered(
        "no-anchor.ndjson", lines[1:], "--public-key", str(pub))
    assert "the record(s) before it (#6) are missing" in tampered(
        "gap.ndjson", [lines[0], lines[1], *lines[3:]], "--public-key", str(pub))
    other = _signer()
    forged = other.sign_anchor("main", 5, first["prev_hash"], T, 2000.0)
    forged_line = orjson.dumps({**first, "key_id": forged.key_id,
                                "signature": forged.signature}) + b"\n"
    assert f"is signed by key {other.key_id}, not the pinned key {SIGNER.key_id}" in tampered(
        "forged.ndjson", [forged_line, *lines[1:]], "--public-key", str(pub))
    edited = lines[2].replace(b'"tenant":"acme"', b'"tenant":"globex"')
    assert edited != lines[2]
    assert "does not match its receipt (edited)" in tampered(
        "edited.ndjson", [*lines[:2], edited, *lines[3:]])
    moved = orjson.dumps({**first, "first_seq": 6}) + b"\n"  # starts the chain later
    assert "not valid (forged or edited)" in tampered(
        "moved.ndjson", [moved, *lines[2:]], "--public-key", str(pub))
    # a filtered export has gaps by design: --filtered checks each record and the anchor
    part = tmp_path / "part.ndjson"
    _export(runner, pruned, part, "--since", "1008")
    strict = runner.invoke(app, ["verify", "--export", str(part), "--public-key", str(pub)])
    assert strict.exit_code == 1 and "--filtered" in strict.output, strict.output
    loose = runner.invoke(app, ["verify", "--export", str(part), "--public-key", str(pub),
                                "--filtered"])
    assert loose.exit_code == 0 and "1 of 1 signatures verified" in loose.output, loose.output


def test_export_verify_refuses_hostile_lines_with_one_line_not_a_traceback(
    pruned: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    out = tmp_path / "x.ndjson"
    _export(runner, pruned, out)
    lines = out.read_bytes().splitlines(keepends=True)
    first, rec = orjson.loads(lines[0]), orjson.loads(lines[1])

    def run(name: str, body: bytes, *extra: str) -> Any:
        f = tmp_path / name
        f.write_bytes(body)
        return runner.invoke(app, ["verify", "--export", str(f), *extra])

    # no key given: the anchor's times are printed, so a time out of range must not crash
    for i, (field, value) in enumerate([("before_unix", 1e308), ("at_unix", -1e308),
                                        ("first_seq", 0), ("first_seq", 5.0),
                                        ("first_seq", "5"), ("shard", 7),
                                        ("before_unix", "nan")]):
        res = run(f"a{i}.ndjson", orjson.dumps({**first, field: value}) + b"\n"
                  + b"".join(lines[1:]))
        assert isinstance(res.exception, SystemExit), (field, value, res.exception)
        assert res.exit_code == 1, (field, value, res.output)
        assert "line 1: a prune anchor with" in res.output, (field, value, res.output)
    # a record's seq must be an integer, its record an object
    for i, (field, value) in enumerate([("seq", 5.9), ("seq", True), ("seq", "5"),
                                        ("record", None), ("receipt", 1)]):
        res = run(f"r{i}.ndjson", lines[0] + orjson.dumps({**rec, field: value}) + b"\n"
                  + b"".join(lines[2:]))
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.exception
        assert "line 2: a record without all its fields (or one of the wrong type)" \
            in res.output, (field, value, res.output)
    # a file that is not NDJSON at all (the likely mistake: a Parquet or gzip export): exit 2
    res = run("x.parquet", b"PAR1\x15\x04\x15\x00garbage\n")
    assert res.exit_code == 2, res.output
    assert "not an NDJSON export (verify --export reads NDJSON only" in res.output
    # --checkpoint-every has no meaning for an export: refused, not ignored
    res = runner.invoke(app, ["verify", "--export", str(out), "--checkpoint-every", "4"])
    assert res.exit_code == 2 and "--checkpoint-every goes with a ledger" in res.output, \
        res.output
    # the time formatting itself is total
    from inferplane.ledger.verify import _iso
    assert _iso(1e308).endswith("(out of range)") and _iso(float("nan")).endswith("range)")


def test_a_parquet_export_carries_the_anchor_in_its_metadata(
    pruned: Path, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "x.parquet"
    _export(CliRunner(), pruned, out, "-f", "parquet")
    meta = pq.read_schema(out).metadata
    anchors = orjson.loads(meta[b"prune_anchors"])
    assert [(a["schema"], a["shard"], a["first_seq"], a["key_id"]) for a in anchors] == [
        ("inferplane.prune/1", "main", 5, SIGNER.key_id)]
