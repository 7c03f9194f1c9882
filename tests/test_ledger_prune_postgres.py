"""``inferplane ledger-prune`` on the PostgreSQL ledger (127.0.0.1:5432, database ``test``):
prune, verify, tampering with the anchor, a writer appending meanwhile, a version-2 ledger.
Skipped, saying why, when no PostgreSQL answers there."""

from __future__ import annotations

import asyncio
import io
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import psycopg
import pytest
from typer.testing import CliRunner

from inferplane.cli import app
from inferplane.ledger import prune as prune_mod
from inferplane.ledger.postgres import PostgresLedger
from inferplane.ledger.prune import prune
from inferplane.ledger.query import Query
from inferplane.ledger.tools import Source, SourceError, export, verify
from inferplane.placement.framework import Decision
from tests.support.postgres import DSN, drop_schema, needs_pg
from tests.test_ledger import FLEET, _ok, _with_id
from tests.test_ledger import decision as decision  # the fixture
from tests.test_ledger_chain import SIGNER

pytestmark = needs_pg

EVERY = 4
N = 12
T = 1006.5  # #1..#4 go (see test_ledger_prune.py)


@pytest.fixture
def schema() -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    drop_schema(name)


def _fill(schema: str, decision: Decision, n: int = N, start: int = 0) -> None:
    async def go() -> None:
        led = PostgresLedger(DSN, schema=schema, signer=SIGNER, checkpoint_every=EVERY,
                             batch_size=5)
        await led.start()
        for i in range(start, start + n):
            led.record(_with_id(decision, f"d-{i}"), _ok(decision), 1000.0 + i)
            if i % 5 == 4:
                assert await led.flush()
        await led.close()

    asyncio.run(go())


def _sql(schema: str, *statements: str) -> None:
    with psycopg.connect(DSN, autocommit=True) as conn:
        for st in statements:
            conn.execute(st.replace("T.", f'"{schema}".inferplane_'))


def _stored(schema: str) -> list[int]:
    with psycopg.connect(DSN) as conn:
        return [r[0] for r in conn.execute(
            f'SELECT chain_seq FROM "{schema}".inferplane_decisions ORDER BY chain_seq')]


def test_prune_verify_and_tampering(schema: str, decision: Decision) -> None:
    _fill(schema, decision)
    src = Source(dsn=DSN, schema=schema)
    dry = prune(src, SIGNER, T, dry_run=True, checkpoint_every=EVERY)
    assert [(p.first, p.cut, p.left_before) for p in dry.plans] == [(1, 4, 3)]
    assert _stored(schema) == list(range(1, N + 1))
    out = prune(src, SIGNER, T, checkpoint_every=EVERY)
    assert len(out.anchors) == 1 and _stored(schema) == list(range(5, N + 1))
    rep = verify(src, SIGNER.public, EVERY)
    assert rep.ok and rep.first == {"main": 5} and rep.anchors_checked == 1, rep.problem
    again = prune(src, SIGNER, T, checkpoint_every=EVERY)
    assert again.plans == [] and _stored(schema) == list(range(5, N + 1))

    _sql(schema, "UPDATE T.prune_anchors SET prev_hash = '" + "cd" * 32 + "'")
    rep = verify(src, SIGNER.public, EVERY)
    assert not rep.ok and "prune anchor at #5 has a signature that is not valid" \
        in (rep.problem or "")
    rep = verify(src, None, EVERY)
    assert not rep.ok and "not the one its prune anchor names" in (rep.problem or "")
    _sql(schema, "DELETE FROM T.prune_anchors")
    rep = verify(src, SIGNER.public, EVERY)
    assert not rep.ok and "no prune anchor accounts for them" in (rep.problem or "")


def test_deleting_past_the_anchor_is_caught(schema: str, decision: Decision) -> None:
    _fill(schema, decision)
    src = Source(dsn=DSN, schema=schema)
    prune(src, SIGNER, T, checkpoint_every=EVERY)
    _sql(schema, "DELETE FROM T.decisions WHERE chain_seq <= 6")
    rep = verify(src, SIGNER.public, EVERY)
    assert not rep.ok and rep.bad_seq == 7 and "(#5..#6) are missing (deleted)" \
        in (rep.problem or "")


def test_a_writer_appending_while_the_prune_runs(schema: str, decision: Decision) -> None:
    """A replica keeps writing the shard (commits between the verify and the prune's
    transaction, and during it): its records stay, chained after the kept ones."""
    _fill(schema, decision)
    src = Source(dsn=DSN, schema=schema)
    real = prune_mod._Store.prune
    started = threading.Event()
    done = threading.Event()

    def slow_prune(self: prune_mod._Store, p: prune_mod.ShardPlan, a: object) -> None:
        started.set()
        real(self, p, a)  # type: ignore[arg-type]
        # the transaction stays open while the writer commits: a writer blocked by it would
        # never get there (and this would fail the prune)
        assert done.wait(10.0), "the writer was blocked by the prune's transaction"

    async def write_during() -> None:
        led = PostgresLedger(DSN, schema=schema, signer=SIGNER, checkpoint_every=EVERY,
                             batch_size=2)
        await led.start()
        try:  # closed whatever happens: a connection left in a COPY would hang the teardown
            assert await asyncio.to_thread(started.wait, 10.0), "the prune did not start"
            rs = [led.record(_with_id(decision, f"w-{i}"), _ok(decision), 3000.0 + i)
                  for i in range(6)]
            # longer than the prune waits: a writer blocked by it fails the prune's assert
            assert all(await asyncio.gather(*(r.durable(30.0) for r in rs)))
            done.set()
        finally:
            await led.close()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prune_mod._Store, "prune", slow_prune)
        t = threading.Thread(target=lambda: asyncio.run(write_during()))
        t.start()
        try:
            prune(src, SIGNER, T, checkpoint_every=EVERY)
        finally:
            t.join(40.0)
        assert not t.is_alive()
    rep = verify(src, SIGNER.public, EVERY)
    assert rep.ok and rep.first == {"main": 5} and rep.shards == {"main": N + 6}, rep.problem


def test_a_stale_prune_is_refused(schema: str, decision: Decision) -> None:
    _fill(schema, decision)
    src = Source(dsn=DSN, schema=schema)
    stale = verify(src, SIGNER.public, EVERY)
    prune(src, SIGNER, T, checkpoint_every=EVERY)  # the other prune: #1..#4
    with pytest.raises(SourceError, match="changed since it was verified"):
        prune_mod._prune_postgres(src, SIGNER, stale, 1010.5, ["main"], False, None)
    assert _stored(schema) == list(range(5, N + 1))


def _version(schema: str) -> int:
    with psycopg.connect(DSN) as conn:
        got = conn.execute(f'SELECT version FROM "{schema}".inferplane_schema_version'
                           ).fetchone()
    assert got is not None
    return int(got[0])


def test_a_version_2_ledger_is_read_and_migrated_by_the_first_prune(
    schema: str, decision: Decision
) -> None:
    """Writers make and keep version 2 (an older gateway still starts on a ledger never
    pruned); the first prune adds the anchors' table (3), which writers then write as it is."""
    _fill(schema, decision)
    assert _version(schema) == 2
    src = Source(dsn=DSN, schema=schema)
    assert verify(src, SIGNER.public, EVERY).ok
    assert prune(src, SIGNER, T, dry_run=True, checkpoint_every=EVERY).plans
    assert _version(schema) == 2
    # runs that prune nothing change nothing, the version included: nothing before 999, and
    # #1, #2 before 1001.5 with no signed checkpoint after them before #3 (the first is #4)
    assert prune(src, SIGNER, 999.0, checkpoint_every=EVERY).nothing_before
    assert prune(src, SIGNER, 1001.5, checkpoint_every=EVERY).idle
    assert _version(schema) == 2
    prune(src, SIGNER, T, checkpoint_every=EVERY)
    assert _version(schema) == 3
    _fill(schema, decision, n=3, start=N)
    assert _version(schema) == 3
    rep = verify(src, SIGNER.public, EVERY)
    assert rep.ok and rep.first == {"main": 5} and rep.shards == {"main": N + 3}, rep.problem


def test_listing_and_export_on_a_pruned_ledger(
    schema: str, decision: Decision, tmp_path: Path
) -> None:
    _fill(schema, decision)
    key = tmp_path / "ledger.key"
    from cryptography.hazmat.primitives import serialization as ser

    key.write_bytes(SIGNER.private.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                                 ser.NoEncryption()))
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(FLEET + f"ledger: {{postgres_dsn: '{DSN}', postgres_schema: {schema}, "
                   f"signing_key_file: {key}, checkpoint_every: {EVERY}}}\n")
    runner = CliRunner()
    res = runner.invoke(app, ["ledger-prune", "--config", str(cfg), "--before", str(T)])
    assert res.exit_code == 0, res.output
    assert "pruned shard main: records #1..#4 (4), anchor at #5" in res.output
    res = runner.invoke(app, ["verify", "--config", str(cfg)])
    assert res.exit_code == 0 and "main (#5..#12; #1..#4 pruned)" in res.output, res.output
    out = io.BytesIO()
    assert export(Source(dsn=DSN, schema=schema), None, "ndjson", out) == N - 4
    lines = out.getvalue().splitlines()  # the anchor first, read in the records' snapshot
    assert orjson.loads(lines[0])["schema"] == "inferplane.prune/1"
    assert orjson.loads(lines[0])["first_seq"] == 5 and orjson.loads(lines[1])["seq"] == 5
    from inferplane.ledger.verify import verify_export

    rep = verify_export(lines, SIGNER.public)
    assert rep.ok and rep.first == {"main": 5} and rep.anchors_checked == 1, rep.problem
    res = runner.invoke(app, ["export", "--config", str(cfg), "-o", str(tmp_path / "x.csv"),
                              "-f", "csv"])
    assert res.exit_code == 0 and "shard main was pruned: its chain starts at #5" in res.output

    async def listing() -> list[str]:
        led = PostgresLedger(DSN, schema=schema)
        await led.start()
        try:
            page = await led.query(Query(tenant=None))
            assert await led.lookup("d-1") is None
            return [it["record"]["decision_id"] for it in page.items]
        finally:
            await led.close()

    assert asyncio.run(listing()) == [f"d-{i}" for i in range(4, N)]


def test_a_multi_line_error_keeps_the_shards_pruned_before_it(
    schema: str, decision: Decision
) -> None:
    """Two shards; the second's transaction fails with PostgreSQL's own error, whose message
    has more lines (here its CONTEXT): the one line the command prints still names the shard
    pruned before it."""
    for shard in ("a", "b"):
        async def go(shard: str = shard) -> None:
            led = PostgresLedger(DSN, schema=schema, shard=shard, signer=SIGNER,
                                 checkpoint_every=EVERY)
            await led.start()
            for i in range(N):
                led.record(_with_id(decision, f"{shard}-{i}"), _ok(decision), 1000.0 + i)
            await led.close()

        asyncio.run(go())
    real = prune_mod._Store.prune

    def fail_on_b(self: prune_mod._Store, p: prune_mod.ShardPlan, a: object) -> None:
        real(self, p, a)  # type: ignore[arg-type]
        if p.shard == "b":  # an error raised in a function: PostgreSQL adds a CONTEXT line
            self.conn.execute("DO $$ BEGIN RAISE EXCEPTION 'disk full' "
                              "USING DETAIL = 'no space left'; END $$")

    src = Source(dsn=DSN, schema=schema)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prune_mod._Store, "prune", fail_on_b)
        with pytest.raises(SourceError) as got:
            prune(src, SIGNER, T, checkpoint_every=EVERY)
    assert "disk full (pruned before it: a up to #4)" in str(got.value), str(got.value)
    rep = verify(src, SIGNER.public, EVERY)
    assert rep.ok and rep.first == {"a": 5, "b": 1}, rep.problem
