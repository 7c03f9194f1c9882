"""The tamper-evident ledger: canonical records, the hash chain, signed checkpoints, verify.

The property test tampers with a real SQLite ledger the way someone with write access to the file
would (sqlite3 UPDATE / DELETE / INSERT, with or without recomputing the hashes after the change)
and checks that `inferplane verify` catches every single-record edit, deletion, insertion and
reordering, naming the first bad record.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import sqlite3
import uuid
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from inferplane.cli import app
from inferplane.ledger.chain import (
    GENESIS,
    Signer,
    chain_hash,
    generate_private_pem,
    load_private,
    public_pem,
)
from inferplane.ledger.sqlite import SqliteLedger
from inferplane.ledger.verify import Report, verify_sqlite
from inferplane.placement.framework import Decision
from tests.test_ledger import _ok, _with_id
from tests.test_ledger import decision as decision  # the fixture

N = 12
EVERY = 4


def _signer() -> Signer:
    return Signer(load_private(generate_private_pem(), "test"))


SIGNER = _signer()


def _write(path: Path, d: Decision, n: int = N, signer: Signer | None = SIGNER) -> None:
    led = SqliteLedger(path, batch_size=5, signer=signer, checkpoint_every=EVERY)
    for i in range(n):
        led.record(_with_id(d, f"d-{i}"), _ok(d, completion_tokens=100 + i), 1000.0 + i)
        if i % 5 == 4:
            assert led.flush()
    led.close_sync()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, decision: Decision) -> Path:
    path = tmp_path_factory.mktemp("chain") / "base.db"
    _write(path, decision)
    return path


def _copy(base: Path, tmp: Path, name: str) -> Path:
    """A fresh copy under a new name (hypothesis reuses ``tmp`` across examples, and a
    left-over ``-wal`` file beside an old name would be read with the new copy)."""
    dst = tmp / f"{uuid.uuid4().hex}-{name}"
    shutil.copyfile(base, dst)
    return dst


def _rows(conn: sqlite3.Connection) -> list[tuple[int, int, str, str, str, str]]:
    return list(conn.execute(
        "SELECT seq, chain_seq, record, receipt, prev_hash, chain_hash FROM decisions "
        "ORDER BY chain_seq"))


def _rechain_from(conn: sqlite3.Connection, start: int) -> None:
    """What a forger without the key does: recompute receipts and the chain from ``start`` (a
    chain_seq) on, and move the head, so that every hash link holds again."""
    rows = _rows(conn)
    prev = GENESIS
    for pos, (row_id, _, text, _, _, _) in enumerate(rows, 1):
        receipt = hashlib.sha256(text.encode()).hexdigest()
        h = chain_hash("main", pos, prev, receipt)
        if pos >= start:
            conn.execute("UPDATE decisions SET chain_seq = -?, receipt = ?, prev_hash = ?, "
                         "chain_hash = ? WHERE seq = ?", (pos, receipt, prev, h, row_id))
        prev = h
    conn.execute("UPDATE decisions SET chain_seq = -chain_seq WHERE chain_seq < 0")
    conn.execute("UPDATE heads SET seq = ?, chain_hash = ?", (len(rows), prev))


def test_an_intact_ledger_verifies_with_its_checkpoints(base: Path) -> None:
    rep = verify_sqlite(str(base), SIGNER.public)
    assert rep.ok, rep.problem
    assert rep.records == N and rep.shards == {"main": N}
    # multiples of 4, plus the end at close (12 is a multiple): 3 checkpoints, all checked
    assert rep.checkpoints == rep.checkpoints_checked == 3
    assert rep.unsigned_tail == {"main": 0}


def test_another_key_or_no_key(base: Path) -> None:
    wrong = verify_sqlite(str(base), _signer().public)
    assert not wrong.ok and "not the pinned key" in (wrong.problem or "")
    unpinned = verify_sqlite(str(base), None)
    assert unpinned.ok and unpinned.checkpoints_checked == 0
    assert any("not checked" in w for w in unpinned.warnings)


def test_the_receipt_is_the_hash_of_the_stored_canonical_record(base: Path) -> None:
    with sqlite3.connect(base) as conn:
        for _, _, text, receipt, _, _ in _rows(conn):
            assert hashlib.sha256(text.encode()).hexdigest() == receipt
            # canon/1: re-serialising the parsed record with sorted keys gives the same bytes
            assert orjson.dumps(orjson.loads(text), option=orjson.OPT_SORT_KEYS) == text.encode()


Mutation = tuple[str, int, int, bool]


@st.composite
def mutations(draw: st.DrawFn) -> Mutation:
    kind = draw(st.sampled_from(["edit", "delete", "insert", "reorder"]))
    i = draw(st.integers(1, N))
    j = draw(st.integers(1, N).filter(lambda x: x != i))
    rehash = draw(st.booleans())  # also recompute every hash after the change (no key)
    return kind, i, j, rehash


def _tamper(path: Path, m: Mutation) -> int:
    """Apply one mutation; return the chain position of the first record it touched."""
    kind, i, j, rehash = m
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        rows = _rows(conn)
        row_id, _, text, _, _, _ = rows[i - 1]
        if kind == "edit":
            rec = orjson.loads(text)
            rec["outcome"]["completion_tokens"] = 0  # e.g. bill nothing
            conn.execute("UPDATE decisions SET record = ? WHERE seq = ?",
                         (orjson.dumps(rec, option=orjson.OPT_SORT_KEYS).decode(), row_id))
            first = i
        elif kind == "delete":
            conn.execute("DELETE FROM decisions WHERE seq = ?", (row_id,))
            first = i
        elif kind == "insert":  # a forged record before position i
            rec = orjson.loads(text)
            rec["decision_id"] = "forged"
            conn.execute("DROP INDEX decisions_by_chain")
            conn.execute(
                "INSERT INTO decisions (decision_id, at_unix, tenant, record, shard, chain_seq, "
                "receipt, prev_hash, chain_hash) SELECT 'forged', at_unix, tenant, ?, shard, "
                "chain_seq, receipt, prev_hash, chain_hash FROM decisions WHERE seq = ?",
                (orjson.dumps(rec, option=orjson.OPT_SORT_KEYS).decode(), row_id))
            new_id = conn.execute("SELECT max(seq) FROM decisions").fetchone()[0]
            # move it into storage position i: shift the later rows' storage ids up by one
            conn.execute("UPDATE decisions SET seq = seq + 1000 WHERE seq >= ? AND seq < ?",
                         (row_id, new_id))
            conn.execute("UPDATE decisions SET seq = ? WHERE seq = ?", (row_id, new_id))
            conn.execute("UPDATE decisions SET chain_seq = chain_seq + 1 WHERE seq >= 1000")
            first = i
        else:  # reorder: records i and j swap places (content moves, positions stay)
            other = rows[j - 1]
            conn.execute("UPDATE decisions SET record = ?, decision_id = 'x' WHERE seq = ?",
                         (other[2], row_id))
            conn.execute("UPDATE decisions SET record = ? WHERE seq = ?", (text, other[0]))
            first = min(i, j)
        if rehash:
            _rechain_from(conn, first)
    return first


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=mutations())
def test_verify_catches_every_single_record_edit_deletion_insertion_and_reordering(
    base: Path, tmp_path: Path, m: Mutation
) -> None:
    path = _copy(base, tmp_path, "t.db")
    first = _tamper(path, m)
    rep: Report = verify_sqlite(str(path), SIGNER.public)
    assert not rep.ok, m
    assert rep.bad_seq is not None and rep.problem
    kind, _, _, rehash = m
    if not rehash and kind == "delete":  # the chain breaks at the record after the gap
        assert rep.bad_seq == min(first + 1, N), (m, rep.problem)
    elif not rehash:  # the hash links break at the tampered record itself
        assert rep.bad_seq == first, (m, rep.problem)
    else:  # links re-forged: the next signed checkpoint (or the head) no longer matches
        assert first <= rep.bad_seq <= N + 1, (m, rep.problem)
    assert f"#{rep.bad_seq}" in rep.problem or str(rep.bad_seq) in rep.problem


def test_rewriting_the_whole_chain_is_caught_by_the_signatures(
    base: Path, tmp_path: Path
) -> None:
    path = _copy(base, tmp_path, "t.db")
    with sqlite3.connect(path) as conn:
        forged = _signer()  # the forger signs fresh checkpoints with a key of their own
        conn.execute("UPDATE decisions SET record = replace(record, '\"status\":200', "
                     "'\"status\":201'), status = 201 WHERE chain_seq = 2")
        _rechain_from(conn, 1)
        conn.execute("DELETE FROM checkpoints")
        for seq, h in conn.execute("SELECT chain_seq, chain_hash FROM decisions").fetchall():
            if seq % EVERY == 0:
                cp = forged.sign("main", seq, h, 1.0)
                conn.execute(
                    "INSERT INTO checkpoints (shard, seq, chain_hash, at_unix, key_id, "
                    "signature) VALUES (?, ?, ?, ?, ?, ?)",
                    (cp.shard, cp.seq, cp.chain_hash, cp.at_unix, cp.key_id, cp.signature))
    rep = verify_sqlite(str(path), SIGNER.public)
    assert not rep.ok and rep.bad_seq == EVERY and "not the pinned key" in (rep.problem or "")


def test_a_forged_signature_under_the_right_key_id_is_caught(base: Path, tmp_path: Path) -> None:
    path = _copy(base, tmp_path, "t.db")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE checkpoints SET signature = ? WHERE seq = 8",
                     ("A" * 86 + "==",))
    rep = verify_sqlite(str(path), SIGNER.public)
    assert not rep.ok and rep.bad_seq == 8 and "signature is not valid" in (rep.problem or "")


def test_deleting_the_tail_is_caught_by_the_head_and_the_last_checkpoint(
    base: Path, tmp_path: Path
) -> None:
    path = _copy(base, tmp_path, "t.db")
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM decisions WHERE chain_seq > 10")
    rep = verify_sqlite(str(path), SIGNER.public)
    assert not rep.ok and "#11..#12 were deleted" in (rep.problem or "")


def test_writers_sharing_a_file_share_one_chain(tmp_path: Path, decision: Decision) -> None:
    path = tmp_path / "l.db"
    a = SqliteLedger(path, signer=SIGNER, checkpoint_every=EVERY)
    b = SqliteLedger(path, signer=SIGNER, checkpoint_every=EVERY)
    for i in range(6):
        (a if i % 2 else b).record(_with_id(decision, f"d-{i}"), _ok(decision), float(i))
        assert a.flush() and b.flush()
    a.close_sync()
    b.close_sync()
    rep = verify_sqlite(str(path), SIGNER.public)
    assert rep.ok and rep.shards == {"main": 6}, rep.problem


def test_a_version_1_file_is_migrated_and_chained(tmp_path: Path, decision: Decision) -> None:
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as conn:
        conn.executescript("""
            CREATE TABLE schema_version (version INTEGER NOT NULL);
            INSERT INTO schema_version VALUES (1);
            CREATE TABLE decisions (seq INTEGER PRIMARY KEY AUTOINCREMENT, decision_id TEXT NOT
              NULL, at_unix REAL NOT NULL, tenant TEXT NOT NULL, endpoint TEXT, workload_class
              TEXT, status INTEGER, ttft_s REAL, cost_usd REAL, record TEXT NOT NULL);
        """)
        for i in range(3):
            rec = {"decision_id": f"old-{i}", "tenant": "acme", "request": {"model": "m"},
                   "picked": {"substrate": "s"}, "outcome": {"status": 200}}
            conn.execute("INSERT INTO decisions (decision_id, at_unix, tenant, record) "
                         "VALUES (?, ?, 'acme', ?)", (f"old-{i}", float(i), orjson.dumps(
                             rec).decode()))
    led = SqliteLedger(path, signer=SIGNER)
    led.record(decision, _ok(decision), 9.0)
    led.close_sync()
    rep = verify_sqlite(str(path), SIGNER.public)
    assert rep.ok and rep.records == 4, rep.problem
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT model, substrate FROM decisions WHERE seq = 1").fetchone() \
            == ("m", "s")


def test_verify_cli(base: Path, tmp_path: Path, decision: Decision) -> None:
    runner = CliRunner()
    pub = tmp_path / "pub.pem"
    pub.write_bytes(public_pem(SIGNER.public))
    ok = runner.invoke(app, ["verify", "--ledger", str(base), "--public-key", str(pub)])
    assert ok.exit_code == 0, ok.output
    assert f"{N} records intact" in ok.output and "3 of 3 signatures verified" in ok.output

    bad = _copy(base, tmp_path, "bad.db")
    with sqlite3.connect(bad) as conn:
        conn.execute("UPDATE decisions SET record = replace(record, '\"status\":200', "
                     "'\"status\":500') WHERE chain_seq = 5")
    out = runner.invoke(app, ["verify", "--ledger", str(bad), "--public-key", str(pub)])
    assert out.exit_code == 1
    assert "TAMPERED" in out.output and "record main#5 (decision d-4)" in out.output
    assert "edited" in out.output

    key = tmp_path / "key.pem"
    made = runner.invoke(app, ["ledger-keygen", "--out", str(key)])
    assert made.exit_code == 0 and "BEGIN PUBLIC KEY" in made.output
    assert (key.stat().st_mode & 0o777) == 0o600
    again = runner.invoke(app, ["ledger-keygen", "--out", str(key)])
    assert again.exit_code == 2
    # --config: the configured ledger and the public half of the configured signing key
    path = tmp_path / "cfg.db"
    signer = Signer(load_private(key.read_bytes(), "k"))
    _write(path, decision, n=5, signer=signer)
    from tests.test_ledger import FLEET

    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(FLEET + f"gateway: {{ledger_path: {path}}}\n"
                   f"ledger: {{signing_key_file: {key}}}\n")
    via = runner.invoke(app, ["verify", "--config", str(cfg)])
    assert via.exit_code == 0, via.output
    assert "5 records intact" in via.output and "2 of 2 signatures verified" in via.output
    missing = runner.invoke(app, ["verify", "--ledger", str(tmp_path / "nope.db")])
    assert missing.exit_code == 2 and "no such ledger file" in missing.output


def test_records_stay_distinct_per_decision(decision: Decision) -> None:
    from inferplane.ledger.record import encode_entry

    a = encode_entry(decision, _ok(decision), 1.0)
    b = encode_entry(replace(decision, decision_id="other"), _ok(decision), 1.0)
    assert a.receipt != b.receipt and len(a.receipt) == 64


COLUMN_EDITS = [
    ("decision_id", "'d-forged'"), ("at_unix", "at_unix + 1"), ("tenant", "'globex'"),
    ("endpoint", "'eu-h100-2'"), ("workload_class", "'batch'"), ("model", "'other-model'"),
    ("substrate", "'other-substrate'"), ("status", "500"), ("ttft_s", "9.5"),
    ("cost_usd", "99"), ("cost_usd", "NULL"),
]


@pytest.mark.parametrize(("column", "value"), COLUMN_EDITS)
async def test_an_edited_indexed_column_fails_verify_and_leaves_the_listing(
    base: Path, tmp_path: Path, column: str, value: str
) -> None:
    """The indexed columns are not covered by the receipt: verify compares each with the
    hashed record, and the decision list leaves out a row whose columns are not its record's
    (audit27 F1: globex listed acme's record after ``UPDATE decisions SET tenant='globex'``)."""
    from inferplane.ledger.query import Query

    path = _copy(base, tmp_path, "col.db")
    with sqlite3.connect(path) as conn:
        conn.execute(f"UPDATE decisions SET {column} = {value} WHERE chain_seq = 3")
    rep = verify_sqlite(str(path), SIGNER.public)
    assert not rep.ok and rep.bad_seq == 3, rep.problem
    assert f"edited (column {column}" in (rep.problem or "")
    led = SqliteLedger(path)
    try:
        every = [it["record"] for it in (await led.query(Query(tenant=None, limit=100))).items]
        assert len(every) == N - 1 and "d-2" not in [r["decision_id"] for r in every]
        globex = (await led.query(Query(tenant="globex"))).items
        assert [it["record"]["tenant"] for it in globex] == []
    finally:
        led.close_sync()


def test_deleting_every_checkpoint_of_a_rewritten_chain_is_caught(
    base: Path, tmp_path: Path
) -> None:
    """audit27 F3: every record edited, the chain re-forged and every checkpoint deleted used
    to verify as "ok … 0 of 0 signatures verified". A keyed verify holds each shard to fewer
    than checkpoint_every records after its last signed checkpoint (none counts)."""
    path = _copy(base, tmp_path, "forged.db")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE decisions SET record = replace(record, '\"status\":200', "
                     "'\"status\":201'), status = 201")
        _rechain_from(conn, 1)
        conn.execute("DELETE FROM checkpoints")
    rep = verify_sqlite(str(path), SIGNER.public, EVERY)
    assert not rep.ok and rep.bad_shard == "main" and rep.bad_seq == 1
    assert f"{N} records after its last signed checkpoint (none)" in (rep.problem or "")
    # without a key there is nothing to hold the tail to (and the output says so)
    assert verify_sqlite(str(path), None, EVERY).ok
    # only the later checkpoints deleted: the tail after #4 is too long
    part = _copy(base, tmp_path, "part.db")
    with sqlite3.connect(part) as conn:
        conn.execute("DELETE FROM checkpoints WHERE seq > 4")
    rep = verify_sqlite(str(part), SIGNER.public, EVERY)
    assert not rep.ok and "8 records after its last signed checkpoint (#4)" in (rep.problem or "")


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_a_killed_writer_never_leaves_a_tail_verify_refuses(
    tmp_path: Path, decision: Decision, batch: int
) -> None:
    """The honest side of the rule: a writer that dies after any commit (never closed, so no
    closing checkpoint) leaves at most checkpoint_every - 1 unsigned records, because the
    checkpoint of each multiple is committed with its record."""
    for n in range(1, 3 * EVERY + 2):
        path = tmp_path / f"killed-{batch}-{n}.db"
        led = SqliteLedger(path, batch_size=batch, signer=SIGNER, checkpoint_every=EVERY)
        for i in range(n):
            led.record(_with_id(decision, f"d-{i}"), _ok(decision), 1000.0 + i)
            if i % batch == batch - 1:
                assert led.flush()
        assert led.flush()
        led._conn.close()  # what a SIGKILL leaves: committed rows, no closing checkpoint
        rep = verify_sqlite(str(path), SIGNER.public, EVERY)
        assert rep.ok, (n, rep.problem)
        assert rep.unsigned_tail["main"] == n % EVERY


def test_verify_cli_prints_the_unsigned_tail_with_a_key(base: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    pub = tmp_path / "pub.pem"
    pub.write_bytes(public_pem(SIGNER.public))
    ok = runner.invoke(app, ["verify", "--ledger", str(base), "--public-key", str(pub)])
    assert ok.exit_code == 0, ok.output
    assert "not yet signed; at most 1000 - 1 allowed): main: 0" in ok.output
    bare = _copy(base, tmp_path, "bare.db")
    with sqlite3.connect(bare) as conn:
        conn.execute("DELETE FROM checkpoints")
    out = runner.invoke(app, ["verify", "--ledger", str(bare), "--public-key", str(pub),
                              "--checkpoint-every", str(EVERY)])
    assert out.exit_code == 1, out.output
    assert "shard main: 12 records after its last signed checkpoint (none)" in out.output


def test_a_shard_written_without_the_key_is_signed_by_ledger_sign_heads(
    tmp_path: Path, decision: Decision
) -> None:
    """An upgrade that turns signing on: the old shard (written without the key, never written
    again) fails verify with a key, naming the harmless cause; the key holder signs its head
    once, after which verify passes and still catches an edit."""
    pem = generate_private_pem()
    key = tmp_path / "ledger.key"
    key.write_bytes(pem)
    signer = Signer(load_private(pem, "test"))
    pub = tmp_path / "pub.pem"
    pub.write_bytes(public_pem(signer.public))
    path = tmp_path / "old.db"
    _write(path, decision, signer=None)
    runner = CliRunner()
    verify_args = ["verify", "--ledger", str(path), "--public-key", str(pub),
                   "--checkpoint-every", str(EVERY)]
    before = runner.invoke(app, verify_args)
    assert before.exit_code == 1, before.output
    assert "written without the signing key" in before.output
    assert "inferplane ledger-sign-heads" in before.output

    tampered = _copy(path, tmp_path, "tampered.db")
    with sqlite3.connect(tampered) as conn:
        conn.execute("UPDATE decisions SET tenant = 'globex' WHERE chain_seq = 3")
    refused = runner.invoke(app, ["ledger-sign-heads", "--ledger", str(tampered),
                                  "--key", str(key)])
    assert refused.exit_code == 1, refused.output
    assert "nothing signed" in refused.output
    with sqlite3.connect(tampered) as conn:
        assert conn.execute("SELECT count(*) FROM checkpoints").fetchone()[0] == 0

    unknown = runner.invoke(app, ["ledger-sign-heads", "--ledger", str(path), "--key", str(key),
                                  "--shard", "gw-0"])
    assert unknown.exit_code == 2 and "no shard gw-0" in unknown.output
    signed = runner.invoke(app, ["ledger-sign-heads", "--ledger", str(path), "--key", str(key)])
    assert signed.exit_code == 0, signed.output
    assert f"signed main at #{N}" in signed.output
    after = runner.invoke(app, verify_args)
    assert after.exit_code == 0, after.output
    assert "main: 0" in after.output
    again = runner.invoke(app, ["ledger-sign-heads", "--ledger", str(path), "--key", str(key)])
    assert again.exit_code == 0 and "nothing to sign" in again.output

    # a keyed writer carries on from the signed head; an edit before it is still caught
    led = SqliteLedger(path, batch_size=5, signer=signer, checkpoint_every=EVERY)
    led.record(_with_id(decision, "d-new"), _ok(decision), 2000.0)
    led.close_sync()
    assert verify_sqlite(str(path), signer.public, EVERY).ok
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE decisions SET record = replace(record, 'd-1\"', 'd-X\"') "
                     "WHERE chain_seq = 2")
    rep = verify_sqlite(str(path), signer.public, EVERY)
    assert not rep.ok and rep.bad_seq == 2


@pytest.mark.parametrize("stored", [float("nan"), float("inf"), float("-inf"), None])
def test_a_non_finite_column_is_the_records_null(stored: float | None) -> None:
    """review27 nit 12: orjson writes NaN and ±inf as null; the column keeps the float. An
    infinite cost stored as inf read as an edited column (a false 'tampered')."""
    from types import SimpleNamespace

    from inferplane.ledger.query import INDEXED_COLUMNS, column_mismatch

    rec = orjson.loads(orjson.dumps({"schema": "x", "decision_id": "d", "outcome": {
        "cost_usd": stored, "ttft_s": 0.5}}))
    assert rec["outcome"]["cost_usd"] is None
    row = SimpleNamespace(**{c: None for c, _ in INDEXED_COLUMNS})
    row.decision_id, row.cost_usd, row.ttft_s = "d", stored, 0.5
    assert column_mismatch(row, rec) is None  # type: ignore[arg-type]
    row.cost_usd = 1.0
    assert column_mismatch(row, rec) == "cost_usd"  # type: ignore[arg-type]
