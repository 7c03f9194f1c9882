"""The PostgreSQL ledger against the local PostgreSQL (127.0.0.1:5432, database ``test``).

Each test works in a schema of its own and drops it. Skipped, saying why, when no PostgreSQL
answers there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from typer.testing import CliRunner

from inferplane.cli import app
from inferplane.ledger.postgres import PostgresLedger, Tables
from inferplane.ledger.query import Query, decode_cursor
from inferplane.ledger.record import Entry
from inferplane.ledger.spool import Spool
from inferplane.ledger.tools import Source, export, verify
from inferplane.placement.framework import Decision
from tests.support.postgres import DSN, drop_schema, needs_pg
from tests.test_ledger import FLEET, _ok, _with_id
from tests.test_ledger import decision as decision  # the fixture
from tests.test_ledger_chain import SIGNER

pytestmark = needs_pg


@pytest.fixture
def schema() -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    drop_schema(name)


@pytest.fixture
async def ledger(schema: str) -> AsyncIterator[PostgresLedger]:
    led = PostgresLedger(DSN, schema=schema, signer=SIGNER, checkpoint_every=4, batch_size=8)
    await led.start()
    yield led
    await led.close()


async def test_records_commit_chain_and_verify(
    ledger: PostgresLedger, schema: str, decision: Decision
) -> None:
    receipts = [ledger.record(_with_id(decision, f"d-{i}"), _ok(decision), 1000.0 + i)
                for i in range(20)]
    assert all(await asyncio.gather(*(r.durable(5.0) for r in receipts)))
    rec = await ledger.lookup("d-3")
    assert rec is not None and rec["decision_id"] == "d-3" and rec["attempts"] == []
    await ledger.close()
    rep = verify(Source(dsn=DSN, schema=schema), SIGNER.public)
    assert rep.ok, rep.problem
    assert rep.records == 20 and rep.checkpoints_checked == 5  # 4, 8, 12, 16, 20
    with psycopg.connect(DSN) as conn:
        got = conn.execute(
            f'SELECT receipt FROM "{schema}".inferplane_decisions ORDER BY chain_seq').fetchall()
    assert [g[0] for g in got] == [r.hash for r in receipts]


async def test_tampering_is_caught(
    ledger: PostgresLedger, schema: str, decision: Decision
) -> None:
    for i in range(10):
        ledger.record(_with_id(decision, f"d-{i}"), _ok(decision), float(i))
    await ledger.close()
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f'UPDATE "{schema}".inferplane_decisions SET record = '
                     "replace(record, '\"status\":200', '\"status\":201') WHERE chain_seq = 7")
    rep = verify(Source(dsn=DSN, schema=schema), SIGNER.public)
    assert not rep.ok and rep.bad_seq == 7 and "edited" in (rep.problem or "")
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f'DELETE FROM "{schema}".inferplane_decisions WHERE chain_seq = 3')
    rep = verify(Source(dsn=DSN, schema=schema), SIGNER.public)
    assert not rep.ok and rep.bad_seq == 4 and "deleted" in (rep.problem or "")


async def test_two_writers_on_one_shard_never_fork_the_chain(
    schema: str, decision: Decision
) -> None:
    """Two replicas writing concurrently: their commits take turns on the shard's head."""
    a = PostgresLedger(DSN, schema=schema, signer=SIGNER, batch_size=4)
    b = PostgresLedger(DSN, schema=schema, signer=SIGNER, batch_size=4)
    await a.start()
    await b.start()
    rs = []
    for i in range(40):
        rs.append((a if i % 2 else b).record(_with_id(decision, f"d-{i}"), _ok(decision), i))
        if i % 7 == 0:
            await asyncio.sleep(0)
    assert all(await asyncio.gather(*(r.durable(10.0) for r in rs)))
    await a.close()
    await b.close()
    rep = verify(Source(dsn=DSN, schema=schema), SIGNER.public)
    assert rep.ok and rep.shards == {"main": 40}, rep.problem


async def test_query_pages_are_tenant_scoped_and_filtered(
    ledger: PostgresLedger, decision: Decision
) -> None:
    for i in range(7):
        ledger.record(_with_id(decision, f"d-{i}"), _ok(decision), 100.0 + i)
    assert await ledger.flush()
    page = await ledger.query(Query(tenant="acme", since=101.0, until=106.0, limit=2))
    ids = [it["record"]["decision_id"] for it in page.items]
    assert ids == ["d-1", "d-2"] and page.next_cursor
    seen = ids
    while page.next_cursor:
        page = await ledger.query(Query(tenant="acme", since=101.0, until=106.0, limit=2,
                                        after=decode_cursor(page.next_cursor)))
        seen += [it["record"]["decision_id"] for it in page.items]
    assert seen == ["d-1", "d-2", "d-3", "d-4", "d-5"]
    assert (await ledger.query(Query(tenant="someone-else"))).items == []
    assert (await ledger.query(Query(tenant="acme", model="nope"))).items == []
    sub = decision.picked.endpoint.substrate.name  # type: ignore[union-attr]
    assert len((await ledger.query(Query(tenant="acme", substrate=sub))).items) == 7


async def test_export_and_cli(ledger: PostgresLedger, schema: str, decision: Decision,
                              tmp_path: Path) -> None:
    for i in range(5):
        ledger.record(_with_id(decision, f"d-{i}"), _ok(decision), 100.0 + i)
    await ledger.close()
    out = io.BytesIO()
    n = export(Source(dsn=DSN, schema=schema), Query(tenant=None, since=101.0), "ndjson", out)
    lines = out.getvalue().splitlines()
    assert n == 4 and len(lines) == 4
    first = orjson.loads(lines[0])
    assert first["record"]["decision_id"] == "d-1" and first["seq"] == 2
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(FLEET + f"ledger: {{postgres_dsn: '{DSN}', postgres_schema: {schema}}}\n")
    runner = CliRunner()
    res = runner.invoke(app, ["verify", "--config", str(cfg)])
    assert res.exit_code == 0 and "5 records intact" in res.output, res.output
    res = runner.invoke(app, ["explain", "d-2", "--config", str(cfg), "--json"])
    assert res.exit_code == 0 and orjson.loads(res.output)["decision_id"] == "d-2"
    res = runner.invoke(app, ["explain", "nope", "--config", str(cfg)])
    assert res.exit_code == 1 and "no decision 'nope'" in res.output
    pq = tmp_path / "x.parquet"
    res = runner.invoke(app, ["export", "--config", str(cfg), "-f", "parquet", "-o", str(pq)])
    assert res.exit_code == 0, res.output
    import pyarrow.parquet as papq

    table = papq.read_table(pq)
    assert table.num_rows == 5 and table.column("decision_id").to_pylist()[0] == "d-0"


async def test_an_unreachable_database_is_a_config_error(schema: str) -> None:
    from inferplane.errors import ConfigError

    led = PostgresLedger("postgresql://postgres@127.0.0.1:1/test", schema=schema)
    with pytest.raises(ConfigError, match=r"ledger\.postgres_dsn: cannot use the database"):
        await led.start()


def test_bad_identifiers_are_refused() -> None:
    with pytest.raises(ValueError):
        Tables('x"; DROP TABLE y; --', "p_")


async def test_copy_exports_match_the_row_by_row_writers(
    ledger: PostgresLedger, schema: str, decision: Decision
) -> None:
    """PostgreSQL builds NDJSON/CSV itself (COPY): the bytes must be what the row-by-row
    writers make, quoting included (a tenant with a quote, a backslash and non-ASCII)."""
    import csv
    from dataclasses import replace

    import pyarrow.parquet as papq

    from inferplane.ledger import postgres as pg
    from inferplane.ledger.query import WRITERS

    odd = replace(decision, profile=replace(decision.profile, tenant='o\'b\\r"ï%sen\tx'))
    for i in range(6):
        d = odd if i % 2 else decision
        ledger.record(_with_id(d, f"d-{i}"), _ok(d), 100.0 + i)
    await ledger.close()
    t = Tables(schema, "inferplane_")
    for q in (None, Query(tenant='o\'b\\r"ï%sen\tx', since=101.0, model=decision.profile.model)):
        with pg.connect_sync(DSN) as conn:
            rows = list(pg.iter_rows(conn, t, q))
        assert rows
        for fmt in ("ndjson", "csv"):
            slow, fast = io.BytesIO(), io.BytesIO()
            assert WRITERS[fmt](rows, slow) == len(rows)
            with pg.connect_sync(DSN) as conn:
                assert pg.COPY_WRITERS[fmt](conn, t, q, fast) == len(rows)
            if fmt == "ndjson":
                assert fast.getvalue() == slow.getvalue()
            else:
                a = list(csv.reader(io.StringIO(slow.getvalue().decode())))
                b = list(csv.reader(io.StringIO(fast.getvalue().decode())))
                assert a[0] == b[0]
                for x, y in zip(a[1:], b[1:], strict=True):
                    assert x[:3] + x[4:] == y[:3] + y[4:]
                    assert float(x[3]) == float(y[3])
        out = io.BytesIO()
        with pg.connect_sync(DSN) as conn:
            assert pg.COPY_WRITERS["parquet"](conn, t, q, out) == len(rows)
        table = papq.read_table(io.BytesIO(out.getvalue()))
        assert table.column("record").to_pylist() == [r.text for r in rows]
        assert table.column("tenant").to_pylist() == [r.tenant for r in rows]
        assert table.column("status").to_pylist() == [r.status for r in rows]


def test_two_gateway_replicas_share_one_ledger(schema: str, tmp_path: Path) -> None:
    """Issue 14: a decision made on one replica is readable on the other, and the two extend
    one verified chain."""
    import httpx

    from tests.builders import model, pool_fleet, to_yaml
    from tests.support.procs import Proc, free_port

    up_port = free_port()
    procs = [Proc(["-m", "tests.support.fake_upstream", "--port", str(up_port), "--mode", "fast"],
                  tmp_path / "up.log")]
    try:
        procs[0].wait_http(f"http://127.0.0.1:{up_port}/health")
        bases = []
        for i in range(2):
            port = free_port()
            cfg = tmp_path / f"fleet-{i}.yaml"
            cfg.write_text(to_yaml(pool_fleet(
                up_port,
                gateway={"port": port, "scrape_interval_s": 0.05},
                ledger={"postgres_dsn": DSN, "postgres_schema": schema},
                admission={"store": "memory"},
                substrate={"cost": {"hourly_usd": 3.0}},
                endpoint_fields={"name": "up", "engine": "vllm"},
                models=[model(max_context=4096)],
                key="k",
            )))
            gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg)],
                      tmp_path / f"gw-{i}.log")
            procs.append(gw)
            bases.append(f"http://127.0.0.1:{port}")
            gw.wait_http(f"{bases[-1]}/ready")
        h = {"Authorization": "Bearer k"}
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        made = []
        for i in range(6):
            r = httpx.post(f"{bases[i % 2]}/v1/chat/completions", json=body, headers=h)
            assert r.status_code == 200
            made.append((r.headers["x-inferplane-decision-id"], r.headers["x-inferplane-receipt"]))
        for i, (did, _) in enumerate(made):  # asked on the replica that did not place it
            rec = httpx.get(f"{bases[(i + 1) % 2]}/v1/decisions/{did}", headers=h)
            assert rec.status_code == 200 and rec.json()["decision_id"] == did
        page = httpx.get(f"{bases[0]}/v1/decisions", headers=h).json()
        assert [(it["record"]["decision_id"], it["receipt"]) for it in page["data"]] == made
    finally:
        for p in procs:
            p.stop()
    rep = verify(Source(dsn=DSN, schema=schema), None)
    assert rep.ok and rep.shards == {"main": 6}, rep.problem


async def test_a_lost_database_session_delays_records_and_loses_none(
    schema: str, decision: Decision
) -> None:
    """The writer's PostgreSQL session is terminated under it (as a failover or a restart of
    the database would): the batch in flight fails, the writer reconnects and retries, every
    record is committed once and the chain stays whole."""
    led = PostgresLedger(DSN, schema=schema, signer=SIGNER, retry_interval_s=0.05)
    await led.start()
    first = [led.record(_with_id(decision, f"a-{i}"), _ok(decision), float(i)) for i in range(10)]
    assert all(await asyncio.gather(*(r.durable(5.0) for r in first)))
    assert led._writer is not None
    pid = led._writer.info.backend_pid
    with psycopg.connect(DSN, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    later = [led.record(_with_id(decision, f"b-{i}"), _ok(decision), 10.0 + i)
             for i in range(10)]
    assert all(await asyncio.gather(*(r.durable(10.0) for r in later)))
    assert led.write_errors >= 1 and led.dropped == 0
    await led.close()
    rep = verify(Source(dsn=DSN, schema=schema), SIGNER.public)
    assert rep.ok and rep.records == 20, rep.problem


DOWN = "postgresql://postgres@127.0.0.1:9/test"  # nothing listens there: the database is down


async def _take_down(led: PostgresLedger) -> None:
    """The database goes away under the writer: its session ends and reconnects are refused."""
    led.dsn = DOWN
    assert led._writer is not None
    pid = led._writer.info.backend_pid
    with psycopg.connect(DSN, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


async def _abandon(led: PostgresLedger) -> None:
    """What kill -9 leaves: the writer stops where it is, nothing is flushed or spooled."""
    assert led._task is not None
    led._task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await led._task
    led._task = None
    await led._close_connections()
    if led._spool is not None:
        led._spool.close()


def _chain(schema: str) -> list[str]:
    with psycopg.connect(DSN) as conn:
        return [r[0] for r in conn.execute(
            f'SELECT decision_id FROM "{schema}".inferplane_decisions ORDER BY chain_seq')]


async def test_records_answered_in_an_outage_survive_a_kill_through_the_spool(
    schema: str, decision: Decision, tmp_path: Path
) -> None:
    """audit27 F2b: with ledger.spool_path, a record answered while the database is down is
    in the local spool before its answer completes (durable() is True), a killed process loses
    none of them, and the next start replays them in order before newer records."""
    spool = str(tmp_path / "spool.sqlite")
    led = PostgresLedger(DSN, schema=schema, signer=SIGNER, checkpoint_every=4,
                         retry_interval_s=0.05, spool_path=spool)
    await led.start()
    first = [led.record(_with_id(decision, f"a-{i}"), _ok(decision), float(i)) for i in range(3)]
    assert all(await asyncio.gather(*(r.durable(5.0) for r in first)))
    await _take_down(led)
    during = [led.record(_with_id(decision, f"b-{i}"), _ok(decision), 10.0 + i)
              for i in range(6)]
    assert all(await asyncio.gather(*(r.durable(10.0) for r in during)))  # spooled
    assert led.spooled == 6 and led.records_spooled == 6 and not led.store_down
    assert (await led.lookup("b-2")) is not None  # still readable from the spool
    await _abandon(led)
    assert _chain(schema) == ["a-0", "a-1", "a-2"]

    again = PostgresLedger(DSN, schema=schema, signer=SIGNER, checkpoint_every=4,
                           spool_path=spool)
    assert again.spooled == 6
    await again.start()
    newer = again.record(_with_id(decision, "c-0"), _ok(decision), 20.0)
    assert await newer.durable(10.0)
    await again.close()
    assert _chain(schema) == ["a-0", "a-1", "a-2"] + [f"b-{i}" for i in range(6)] + ["c-0"]
    rep = verify(Source(dsn=DSN, schema=schema), SIGNER.public, 4)
    assert rep.ok and rep.records == 10, rep.problem

    # a replay that had committed but not yet emptied its spool when killed: no duplicates
    s = Spool(spool)
    with psycopg.connect(DSN) as conn:
        texts = [r[0] for r in conn.execute(
            f'SELECT record FROM "{schema}".inferplane_decisions WHERE chain_seq > 7 '
            "ORDER BY chain_seq")]
    s.add([Entry(decision_id=orjson.loads(t)["decision_id"], at_unix=0.0, tenant="acme",
                 endpoint=None, workload_class="x", model="m", substrate=None, status=200,
                 ttft_s=None, cost_usd=None, text=t,
                 receipt=hashlib.sha256(t.encode()).hexdigest()) for t in texts])
    s.close()
    third = PostgresLedger(DSN, schema=schema, signer=SIGNER, spool_path=spool)
    await third.start()
    await third.close()
    assert third.spooled == 0 and len(_chain(schema)) == 10
    # the skipped records are not counted as written (they were, by the crashed replay)
    assert (third.records_written, third.batches_written) == (0, 0)


async def test_a_stop_during_an_outage_spools_what_is_pending(
    schema: str, decision: Decision, tmp_path: Path
) -> None:
    """SIGTERM in an outage used to log "closing with N unwritten records (dropped)"."""
    spool = str(tmp_path / "spool.sqlite")
    led = PostgresLedger(DSN, schema=schema, retry_interval_s=30.0, spool_path=spool)
    await led.start()
    assert await led.record(_with_id(decision, "a-0"), _ok(decision), 1.0).durable(5.0)
    await _take_down(led)
    for i in range(4):
        led.record(_with_id(decision, f"b-{i}"), _ok(decision), 2.0 + i)
    await led.close()
    assert led.dropped == 0 and led.spooled == 4
    again = PostgresLedger(DSN, schema=schema, spool_path=spool)
    await again.start()
    await again.close()
    assert _chain(schema) == ["a-0", "b-0", "b-1", "b-2", "b-3"]


async def test_without_a_spool_answers_do_not_wait_while_the_database_is_down(
    schema: str, decision: Decision
) -> None:
    led = PostgresLedger(DSN, schema=schema, retry_interval_s=0.05)
    await led.start()
    assert await led.record(_with_id(decision, "a-0"), _ok(decision), 1.0).durable(5.0)
    await _take_down(led)
    r = led.record(_with_id(decision, "b-0"), _ok(decision), 2.0)
    async with asyncio.timeout(30):
        while not led.store_down:
            await asyncio.sleep(0.02)
    assert not r.committed
    led.dsn = DSN  # the database is back: the pending record is written
    assert await r.durable(10.0) and not led.store_down
    await led.close()


async def test_an_edited_indexed_column_fails_verify_and_leaves_the_listing(
    ledger: PostgresLedger, schema: str, decision: Decision
) -> None:
    """audit27 F1 on PostgreSQL: ``UPDATE … SET tenant='globex', cost_usd=99`` put acme's
    record into globex's listing and verify said ok."""
    for i in range(7):
        ledger.record(_with_id(decision, f"d-{i}"), _ok(decision), 100.0 + i)
    await ledger.close()
    for column, value in (("cost_usd", "99"), ("tenant", "'globex'")):
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f'UPDATE "{schema}".inferplane_decisions SET {column} = {value} '
                         "WHERE chain_seq = 3")
        rep = verify(Source(dsn=DSN, schema=schema), SIGNER.public)
        assert not rep.ok and rep.bad_seq == 3, rep.problem
        assert f"edited (column {column}" in (rep.problem or "")
    reader = PostgresLedger(DSN, schema=schema)
    await reader.start()
    try:
        assert (await reader.query(Query(tenant="globex"))).items == []
        acme = [it["record"]["decision_id"] for it in (await reader.query(
            Query(tenant="acme"))).items]
        assert acme == ["d-0", "d-1", "d-3", "d-4", "d-5", "d-6"]
    finally:
        await reader.close()


async def test_sign_heads_on_postgres_after_turning_signing_on(
    schema: str, decision: Decision, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """review27 must 1: deploy/k8s wrote shard ``main`` without a key; after the upgrade
    (key + one shard per pod) nobody writes ``main`` again and verify --config failed on it
    for good. ``ledger-sign-heads --config`` signs its head once."""
    from inferplane.ledger.chain import generate_private_pem, load_private

    led = PostgresLedger(DSN, schema=schema, checkpoint_every=4)  # no key: the old deployment
    await led.start()
    for i in range(9):
        led.record(_with_id(decision, f"d-{i}"), _ok(decision), 100.0 + i)
    await led.close()
    pem = generate_private_pem()
    monkeypatch.setenv("TEST_LEDGER_KEY", pem.decode())
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(FLEET + f"ledger: {{postgres_dsn: '{DSN}', postgres_schema: {schema}, "
                   "signing_key_env: TEST_LEDGER_KEY, checkpoint_every: 4}\n")
    runner = CliRunner()
    res = runner.invoke(app, ["verify", "--config", str(cfg)])
    assert res.exit_code == 1 and "written without the signing key" in res.output, res.output
    res = runner.invoke(app, ["ledger-sign-heads", "--config", str(cfg)])
    assert res.exit_code == 0 and "signed main at #9" in res.output, res.output
    res = runner.invoke(app, ["verify", "--config", str(cfg)])
    assert res.exit_code == 0 and "main: 0" in res.output, res.output
    rep = verify(Source(dsn=DSN, schema=schema), load_private(pem, "t").public_key(), 4)
    assert rep.ok and rep.checkpoints_checked == 1


def _spool_of(path: str, decision: Decision, ids: list[str]) -> None:
    from inferplane.ledger.record import encode_entry

    s = Spool(path)
    s.add([encode_entry(_with_id(decision, i), _ok(decision), float(n))
           for n, i in enumerate(ids)])
    s.close()


class _Failing:
    """Wraps a spool method: raises ``times`` times (forever with None), then calls through."""

    def __init__(self, fn: object, times: int | None) -> None:
        self.fn, self.left, self.calls = fn, times, 0

    def __call__(self, *a: object) -> object:
        self.calls += 1
        if self.left is None or self.left > 0:
            if self.left is not None:
                self.left -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return self.fn(*a)  # type: ignore[operator]


@pytest.mark.parametrize("method", ["oldest", "remove"])
async def test_a_spool_error_in_replay_does_not_kill_the_writer(
    schema: str, decision: Decision, tmp_path: Path, method: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """review27 should 2: ``Spool.oldest``/``remove`` raising (database is locked, disk I/O
    error) used to end the writer task: nothing was written from then on and close() re-raised
    the error. Now the replay is retried (a commit whose remove failed is skipped by the
    dedupe), logged once, and every record reaches the database once, in order."""
    spool = str(tmp_path / "spool.sqlite")
    _spool_of(spool, decision, ["s-0", "s-1", "s-2"])
    led = PostgresLedger(DSN, schema=schema, retry_interval_s=0.02, spool_path=spool)
    assert led._spool is not None
    failing = _Failing(getattr(led._spool, method), 3)
    setattr(led._spool, method, failing)
    await led.start()
    r = led.record(_with_id(decision, "n-0"), _ok(decision), 9.0)
    assert await r.durable(20.0)
    async with asyncio.timeout(20):
        while led.spooled:
            await asyncio.sleep(0.02)
    assert failing.calls > 3 and led._task is not None and not led._task.done()
    await led.close()
    assert _chain(schema) == ["s-0", "s-1", "s-2", "n-0"]
    assert led.spool_errors == 3
    assert len([m for m in caplog.messages if "the spool" in m and "cannot" in m]) == 1


async def test_close_does_not_raise_when_the_spool_cannot_be_emptied(
    schema: str, decision: Decision, tmp_path: Path
) -> None:
    spool = str(tmp_path / "spool.sqlite")
    _spool_of(spool, decision, ["s-0", "s-1"])
    led = PostgresLedger(DSN, schema=schema, retry_interval_s=0.02, spool_path=spool)
    assert led._spool is not None
    led._spool.remove = _Failing(led._spool.remove, None)  # type: ignore[method-assign]
    await led.start()
    assert await led.record(_with_id(decision, "n-0"), _ok(decision), 9.0).durable(20.0)
    await led.close()  # used to re-raise the writer's sqlite3 error
    assert _chain(schema) == ["s-0", "s-1", "n-0"]  # written once each, despite the retries
    again = PostgresLedger(DSN, schema=schema, spool_path=spool)  # the file still holds them
    await again.start()
    await again.close()
    assert again.spooled == 0 and _chain(schema) == ["s-0", "s-1", "n-0"]


async def test_when_the_spool_cannot_be_written_either_answers_do_not_wait(
    schema: str, decision: Decision, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """review27 should 6: a full disk under the spool during an outage logged one ERROR per
    record and every answer waited commit_timeout_s (store_down stayed False)."""
    led = PostgresLedger(DSN, schema=schema, retry_interval_s=0.02,
                         spool_path=str(tmp_path / "spool.sqlite"))
    assert led._spool is not None
    led._spool.add = _Failing(led._spool.add, None)  # type: ignore[method-assign]
    await led.start()
    assert await led.record(_with_id(decision, "a-0"), _ok(decision), 1.0).durable(5.0)
    await _take_down(led)
    receipts = []
    for i in range(20):
        receipts.append(led.record(_with_id(decision, f"b-{i}"), _ok(decision), 2.0 + i))
        await asyncio.sleep(0.01)
    async with asyncio.timeout(20):
        while not led.store_down:
            await asyncio.sleep(0.02)
    assert led.spool_errors > 1
    assert len([m for m in caplog.messages if "cannot spool" in m]) == 1
    led.dsn = DSN
    assert all(await asyncio.gather(*(r.durable(20.0) for r in receipts)))
    assert not led.store_down
    await led.close()


@pytest.mark.parametrize("spooled", [False, True])
async def test_a_write_that_hangs_counts_as_the_database_down(
    schema: str, decision: Decision, tmp_path: Path, spooled: bool
) -> None:
    """review27 should 3: a commit on a connection whose host vanished (no RST) hangs until
    TCP gives up; the failure-based store_down never engaged and every answer waited
    commit_timeout_s (with a spool too: nothing is spooled while the writer waits). A write in
    flight for stall_timeout_s (the gateway passes ledger.commit_timeout_s) now counts as
    down, shown on the metrics page; when it completes, nothing is lost."""
    from inferplane.api.pipeline import Gateway
    from inferplane.config.loader import parse_config

    led = PostgresLedger(DSN, schema=schema, retry_interval_s=0.02, stall_timeout_s=0.05,
                         spool_path=str(tmp_path / "spool.sqlite") if spooled else None)
    await led.start()
    gate = asyncio.Event()
    real = led._commit

    async def hung(*a: Any, **kw: Any) -> Any:
        await gate.wait()
        return await real(*a, **kw)

    led._commit = hung  # type: ignore[method-assign]
    r = led.record(_with_id(decision, "a-0"), _ok(decision), 1.0)
    async with asyncio.timeout(30):
        while not led.store_down:
            await asyncio.sleep(0.01)
    gw = Gateway(parse_config(FLEET), ledger=led)
    assert b"inferplane_ledger_store_down 1.0" in gw.metrics_page()
    assert not r.committed
    gate.set()
    assert await r.durable(20.0) and not led.store_down
    await led.close()
    assert _chain(schema) == ["a-0"]


async def test_a_tampered_spooled_record_is_refused_not_signed(
    schema: str, decision: Decision, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A spooled record whose text no longer hashes to its receipt (the file edited), or
    whose column is not its record's value, is refused by the replay: not chained, not signed
    (verify would otherwise fail the whole ledger for it, or a forger's record would be signed
    in), moved to the spool's ``refused`` table and logged; the others are written."""
    spool = str(tmp_path / "spool.sqlite")
    _spool_of(spool, decision, ["s-0", "s-1", "s-2", "s-3"])
    with contextlib.closing(sqlite3.connect(spool)) as conn, conn:
        conn.execute("UPDATE spooled SET record = replace(record, '\"acme\"', '\"globex\"') "
                     "WHERE decision_id = 's-1'")
        conn.execute("UPDATE spooled SET tenant = 'globex' WHERE decision_id = 's-2'")
    led = PostgresLedger(DSN, schema=schema, signer=SIGNER, checkpoint_every=4,
                         spool_path=spool)
    caplog.set_level(logging.DEBUG, logger="inferplane.ledger")
    await led.start()
    await led.close()
    assert _chain(schema) == ["s-0", "s-3"]
    assert led.spool_refused == 2 and led.spooled == 0 and led.records_written == 2
    # one ERROR for the pass, with the count and the first; each record's reason at DEBUG
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].startswith("ledger postgres: 2 spooled records refused, not written "
                                "(first: decision s-1: ") and "does not match its receipt" \
        in errors[0], errors
    detail = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG
              and "refused:" in r.getMessage()]
    assert len(detail) == 2 and "s-1" in detail[0] and "column tenant" in detail[1], detail
    s = Spool(spool)
    try:
        assert s.refused() == 2 and s.count() == 0
    finally:
        s.close()
    rep = verify(Source(dsn=DSN, schema=schema), SIGNER.public, 4)
    assert rep.ok and rep.records == 2, rep.problem


async def test_the_resumed_line_is_logged_when_the_last_pass_refuses_all_it_took(
    schema: str, decision: Decision, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The replay's last pass refuses every record it took (tampered): nothing commits after
    it, and the 'writes resumed' line is still logged when the spool empties (it waited for
    the next live commit, and counted that batch too)."""
    spool = str(tmp_path / "spool.sqlite")
    led = PostgresLedger(DSN, schema=schema, batch_size=2, retry_interval_s=0.05,
                         spool_path=spool)
    await led.start()
    try:
        assert await led.record(_with_id(decision, "a-0"), _ok(decision), 1.0).durable(5.0)
        await _take_down(led)
        during = [led.record(_with_id(decision, f"b-{i}"), _ok(decision), 2.0 + i)
                  for i in range(4)]
        assert all(await asyncio.gather(*(r.durable(10.0) for r in during)))
        assert led.spooled == 4
        with contextlib.closing(sqlite3.connect(spool)) as conn, conn:
            n = conn.execute("UPDATE spooled SET record = replace(record, '\"acme\"', "
                             "'\"globex\"') WHERE decision_id IN ('b-2', 'b-3')").rowcount
        assert n == 2
        led.dsn = DSN  # the database is back
        async with asyncio.timeout(20):  # a guard: fails here when the line never comes
            while not any("writes resumed" in m for m in caplog.messages):
                await asyncio.sleep(0.02)
        assert led.spooled == 0 and led.spool_refused == 2
    finally:
        await led.close()
    resumed = [m for m in caplog.messages if "writes resumed" in m]
    assert len(resumed) == 1 and "2 records written since the outage began" in resumed[0], \
        resumed
    assert _chain(schema) == ["a-0", "b-0", "b-1"]


async def test_the_resumed_line_waits_for_the_spool_to_be_written(
    schema: str, decision: Decision, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After an outage with a spool, 'writes resumed … N records written' is logged once the
    spool is empty, counting all of them (it used to fire after the first replayed batch)."""
    spool = str(tmp_path / "spool.sqlite")
    led = PostgresLedger(DSN, schema=schema, batch_size=2, retry_interval_s=0.05,
                         spool_path=spool)
    await led.start()
    try:
        assert await led.record(_with_id(decision, "a-0"), _ok(decision), 1.0).durable(5.0)
        await _take_down(led)
        during = [led.record(_with_id(decision, f"b-{i}"), _ok(decision), 2.0 + i)
                  for i in range(6)]
        assert all(await asyncio.gather(*(r.durable(10.0) for r in during)))
        assert led.spooled == 6
        led.dsn = DSN  # the database is back
        async with asyncio.timeout(20):
            while led.spooled or led.writes_failing:
                await asyncio.sleep(0.02)
    finally:
        await led.close()
    resumed = [m for m in caplog.messages if "writes resumed" in m]
    assert len(resumed) == 1 and "6 records written since the outage began" in resumed[0], \
        resumed
