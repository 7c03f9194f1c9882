"""The SQLite ledger (buffered, batched, crash-safe), its explanation, and `inferplane explain`."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from rich.console import Console
from typer.testing import CliRunner

from inferplane.cli import app
from inferplane.config.loader import parse_config
from inferplane.errors import ConfigError
from inferplane.fleet.live import LiveFleet
from inferplane.fleet.model import Fleet
from inferplane.ledger.explain import print_decision
from inferplane.ledger.record import (
    RECORD_SCHEMA,
    Outcome,
    _plain,
    decision_to_dict,
    encode_entry,
)
from inferplane.ledger.sqlite import (
    _INSERT,
    SCHEMA_VERSION,
    LedgerFileError,
    Row,
    SqliteLedger,
    read_decision,
)
from inferplane.placement.build import build_policies
from inferplane.placement.framework import (
    CandidateRecord,
    Decision,
    Evidence,
    Spillover,
    place,
)
from inferplane.placement.profile import RequestProfile

FLEET = """
regions: [{name: eu-west}, {name: us-east}]
substrates:
  - name: eu-h100
    kind: gpu
    hardware: h100
    region: eu-west
    jurisdiction: eu
    cost: {hourly_usd: 3.5}
    endpoints:
      - {name: eu-h100-0, url: "http://127.0.0.1:9001", models: [{name: llama-3.1-8b, max_context: 32768, variant: instruct, precision: fp8}]}
      - {name: eu-h100-1, url: "http://127.0.0.1:9002", models: [{name: llama-3.1-8b, max_context: 32768}]}
  - name: eu-embed
    kind: gpu
    hardware: l4
    region: eu-west
    jurisdiction: eu
    cost: {input_per_mtok: 0.02, output_per_mtok: 0.0}
    endpoints:
      - {name: eu-embed-0, url: "http://127.0.0.1:9003", models: [{name: bge-large, max_context: 512, kind: embed}]}
tenants:
  - name: acme
    api_keys: ["sha256:5c0900028d88a97d85eeeea8f2b20fe468d3403bbfa203dca2bef8f87f07cbf4"]
"""  # noqa: E501


@pytest.fixture(scope="module")
def decision() -> Decision:
    return _placed()


def _placed() -> Decision:
    config = parse_config(FLEET, "fleet.yaml")
    live = LiveFleet(Fleet.from_config(config), stale_after_s=2.0)
    policy = build_policies(config, "fleet.yaml")["default"]
    profile = RequestProfile(
        request_id="d-1",
        tenant="acme",
        model="llama-3.1-8b",
        prompt_tokens=1200,
        max_output_tokens=256,
        ttft_slo_s=0.5,
        allowed_jurisdictions=frozenset({"eu"}),
        client_region="eu-west",
    )
    d = place(profile, live.snapshot(), policy, decision_id="d-1", timer=time.perf_counter)
    assert d.picked is not None
    return d


def _with_id(d: Decision, decision_id: str) -> Decision:
    return replace(d, decision_id=decision_id)


def _ok(d: Decision, **kw: object) -> Outcome:
    fields: dict[str, object] = {
        "status": 200,
        "endpoint": d.endpoint,
        "ttft_s": 0.042,
        "itl_s": 0.011,
        "e2e_s": 1.3,
        "prompt_tokens": 1180,
        "completion_tokens": 120,
        "cached_tokens": 512,
        "cost_usd": 0.000321,
    }
    fields.update(kw)
    return Outcome(**fields)  # type: ignore[arg-type]


def _rows(path: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(path) as conn:
        return list(conn.execute("SELECT decision_id, status FROM decisions ORDER BY seq"))


# -- storage ------------------------------------------------------------------------------------
async def test_record_flush_reopen_get(tmp_path: Path, decision: Decision) -> None:
    path = tmp_path / "ledger.db"
    ledger = SqliteLedger(path)
    await ledger.start()
    ledger.record(decision, _ok(decision), 1_700_000_000.5)
    await ledger.close()

    reopened = SqliteLedger(path)
    rec = reopened.get("d-1")
    assert rec is not None
    assert rec["decision_id"] == "d-1" and rec["tenant"] == "acme"
    assert rec["at_unix"] == 1_700_000_000.5
    assert rec["picked"]["endpoint"] == decision.endpoint
    assert rec["outcome"]["ttft_s"] == 0.042 and rec["outcome"]["cached_tokens"] == 512
    assert rec["attempts"] == []
    assert reopened.get("nope") is None
    with sqlite3.connect(path) as conn:
        row = conn.execute(
            "SELECT tenant, endpoint, workload_class, status, ttft_s, cost_usd FROM decisions"
        ).fetchone()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert row == ("acme", decision.endpoint, "interactive", 200, 0.042, 0.000321)
    reopened.close_sync()


async def test_the_last_record_of_an_id_wins_and_earlier_ones_are_attempts(
    tmp_path: Path, decision: Decision
) -> None:
    ledger = SqliteLedger(tmp_path / "l.db")
    failed = Outcome(status=502, endpoint="eu-h100-0", error="connect refused",
                     failed_endpoints=("eu-h100-0",))
    ledger.record(decision, failed, 1.0)
    assert ledger.flush()
    ledger.record(decision, _ok(decision, attempts=2, failed_endpoints=("eu-h100-0",)), 2.0)
    # one attempt on disk, the final one still pending: get() merges both, in order
    rec = ledger.get("d-1")
    assert rec is not None
    assert rec["outcome"]["status"] == 200 and rec["at_unix"] == 2.0
    assert [a["outcome"]["status"] for a in rec["attempts"]] == [502]
    ledger.close_sync()
    rec2 = read_decision(tmp_path / "l.db", "d-1")
    assert rec2 is not None and rec2["outcome"]["status"] == 200
    assert [a["outcome"]["error"] for a in rec2["attempts"]] == ["connect refused"]
    assert _rows(tmp_path / "l.db") == [("d-1", 502), ("d-1", 200)]


async def test_pending_records_are_visible_before_any_flush(
    tmp_path: Path, decision: Decision
) -> None:
    ledger = SqliteLedger(tmp_path / "l.db", flush_interval_s=60, group_commit=False)
    await ledger.start()
    ledger.record(decision, _ok(decision), 5.0)
    assert ledger.pending == 1
    rec = ledger.get("d-1")
    assert rec is not None and rec["outcome"]["status"] == 200
    assert _rows(tmp_path / "l.db") == []  # nothing on disk yet
    await ledger.close()  # close flushes
    assert _rows(tmp_path / "l.db") == [("d-1", 200)]
    assert ledger.pending == 0


async def test_many_records_are_written_in_few_transactions(
    tmp_path: Path, decision: Decision
) -> None:
    path = tmp_path / "l.db"
    ledger = SqliteLedger(path, batch_size=100, flush_interval_s=60, group_commit=False)
    commits: list[str] = []
    ledger._conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    await ledger.start()
    for i in range(1000):
        ledger.record(_with_id(decision, f"d-{i}"), _ok(decision), float(i))
    await ledger.close()
    assert ledger.records_written == 1000
    assert ledger.batches_written == len(commits) == 10
    assert len(_rows(path)) == 1000


async def test_the_writer_thread_flushes_on_its_interval(
    tmp_path: Path, decision: Decision
) -> None:
    path = tmp_path / "l.db"
    ledger = SqliteLedger(path, flush_interval_s=0.02, group_commit=False)
    await ledger.start()
    ledger.record(decision, _ok(decision), 1.0)
    deadline = time.monotonic() + 5
    while not _rows(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _rows(path) == [("d-1", 200)]
    await ledger.close()


async def test_group_commit_settles_receipts_once_their_rows_are_on_disk(
    tmp_path: Path, decision: Decision
) -> None:
    path = tmp_path / "l.db"
    ledger = SqliteLedger(path)  # group commit (the default)
    commits: list[str] = []
    ledger._conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    await ledger.start()
    receipts = [ledger.record(_with_id(decision, f"d-{i}"), _ok(decision), float(i))
                for i in range(200)]
    assert all(r.committed is None for r in receipts)  # nothing committed yet
    assert all(await asyncio.gather(*(r.durable(5.0) for r in receipts)))
    assert len(_rows(path)) == 200  # durable() returned: every row is readable by others
    assert 1 <= len(commits) < 200  # recorded together, committed in groups
    await ledger.close()


class FailingLedger(SqliteLedger):
    """Inserts half of each batch, then fails while ``failing`` is set."""

    failing = True

    def _insert_rows(self, conn: sqlite3.Connection, rows: Sequence[Row]) -> None:
        if self.failing:
            conn.executemany(_INSERT, rows[: len(rows) // 2])
            raise sqlite3.OperationalError("attempt to write a readonly database")
        super()._insert_rows(conn, rows)


def test_a_failed_batch_leaves_earlier_batches_and_no_partial_rows(
    tmp_path: Path, decision: Decision, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "l.db"
    good = SqliteLedger(path, batch_size=10)
    for i in range(20):
        good.record(_with_id(decision, f"ok-{i}"), _ok(decision), float(i))
    good.close_sync()

    bad = FailingLedger(path, batch_size=10, max_pending=25)
    for i in range(20):
        bad.record(_with_id(decision, f"new-{i}"), _ok(decision), float(i))
    assert bad.flush() is False and bad.flush() is False  # never raises
    assert [r[0] for r in _rows(path)] == [f"ok-{i}" for i in range(20)]  # nothing partial
    assert bad.pending == 20 and bad.write_errors == 2 and bad.dropped == 0
    assert sum("write failed" in r.message for r in caplog.records) == 1  # once a minute
    assert bad.get("new-3") is not None  # still served from the buffer

    for i in range(20, 30):  # over max_pending: the oldest go, and are counted
        bad.record(_with_id(decision, f"new-{i}"), _ok(decision), float(i))
    assert bad.pending == 25 and bad.dropped == 5

    bad.failing = False  # the disk comes back: everything kept is written exactly once
    bad.close_sync()
    ids = [r[0] for r in _rows(path)]
    assert ids == [f"ok-{i}" for i in range(20)] + [f"new-{i}" for i in range(5, 30)]


def test_a_writer_killed_mid_batch_leaves_a_readable_file(tmp_path: Path) -> None:
    """A real crash: the process exits inside a batch's transaction, after half its rows."""
    path = tmp_path / "l.db"
    script = textwrap.dedent(
        f"""
        import os, sqlite3
        from tests.test_ledger import FLEET, _ok, _with_id
        from inferplane.config.loader import parse_config
        from inferplane.fleet.live import LiveFleet
        from inferplane.fleet.model import Fleet
        from inferplane.ledger.sqlite import SqliteLedger, _INSERT
        from inferplane.placement.build import build_policies
        from inferplane.placement.framework import place
        from inferplane.placement.profile import RequestProfile

        cfg = parse_config(FLEET)
        d = place(RequestProfile("x", "acme", "llama-3.1-8b"),
                  LiveFleet(Fleet.from_config(cfg)).snapshot(), build_policies(cfg)["default"])

        class Dies(SqliteLedger):
            def _insert_rows(self, conn, rows):
                if rows[0][0] == "b-0":
                    conn.executemany(_INSERT, rows[:5])
                    os._exit(9)
                super()._insert_rows(conn, rows)

        led = Dies({str(path)!r}, batch_size=10)
        for i in range(10):
            led.record(_with_id(d, f"a-{{i}}"), _ok(d), float(i))
        led.flush()
        for i in range(10):
            led.record(_with_id(d, f"b-{{i}}"), _ok(d), float(i))
        led.flush()
        """
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert [r[0] for r in _rows(path)] == [f"a-{i}" for i in range(10)]
    reopened = SqliteLedger(path)  # and the gateway can go on with it
    assert reopened.get("a-9") is not None and reopened.get("b-0") is None
    reopened.close_sync()


def test_the_encoded_row_is_decision_to_dict_plus_at_unix(decision: Decision) -> None:
    spilled = replace(decision, spillover=Spillover("saturated", "a", "b", None, "eu-west"))
    nothing = replace(decision, picked=None, removed_by={"jurisdiction": 3})
    for d, o in [
        (decision, _ok(decision, failed_endpoints=("x",), attempts=2)),
        (spilled, _ok(spilled)),
        (nothing, Outcome(status=503, endpoint=None)),
    ]:
        e = encode_entry(d, o, 12.5)
        expected = {**decision_to_dict(d, o), "at_unix": 12.5, "schema": RECORD_SCHEMA}
        assert orjson.loads(e.text) == orjson.loads(orjson.dumps(expected))
        assert (e.decision_id, e.at_unix, e.tenant, e.endpoint, e.workload_class, e.status,
                e.ttft_s, e.cost_usd) == (d.decision_id, 12.5, "acme", o.endpoint,
                                          "interactive", o.status, o.ttft_s, o.cost_usd)
        # canon/1: the stored text is sorted-key compact JSON, and its hash is the receipt
        assert e.text.encode() == orjson.dumps(orjson.loads(e.text), option=orjson.OPT_SORT_KEYS)
        assert e.receipt == hashlib.sha256(e.text.encode()).hexdigest()


def test_a_record_that_cannot_be_serialised_is_dropped_not_retried_forever(
    tmp_path: Path, decision: Decision
) -> None:
    path = tmp_path / "l.db"
    ledger = SqliteLedger(path)
    poison = replace(decision, decision_id="poison", timings_s={1: 0.1})  # type: ignore[dict-item]
    ledger.record(poison, _ok(decision), 1.0)
    ledger.record(decision, _ok(decision), 2.0)
    assert ledger.get("poison") is None and ledger.get("d-1") is not None
    ledger.close_sync()
    assert _rows(path) == [("d-1", 200)] and ledger.dropped == 1


# -- start-up errors ----------------------------------------------------------------------------
def test_a_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        SqliteLedger(tmp_path / "nope" / "l.db", source="fleet.yaml")
    assert "fleet.yaml: gateway.ledger_path:" in str(err.value)
    assert "does not exist" in str(err.value)


def test_an_unwritable_location_is_a_config_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root may write anywhere chmod forbids: use a kernel filesystem
        target = Path("/proc/inferplane-ledger.db")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        target = ro / "l.db"
    with pytest.raises(ConfigError) as err:
        SqliteLedger(target)
    assert "gateway.ledger_path" in str(err.value)


def test_a_newer_schema_or_a_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    SqliteLedger(path).close_sync()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    newer = f"schema version {SCHEMA_VERSION + 1} is a newer version"
    with pytest.raises(ConfigError, match=newer):
        SqliteLedger(path)
    with pytest.raises(LedgerFileError, match="newer"):
        read_decision(path, "x")

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(ConfigError, match="not an inferplane ledger"):
        SqliteLedger(other)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match=r"gateway\.ledger_path"):
        SqliteLedger(junk)


def test_the_gateway_uses_sqlite_when_a_path_is_configured(tmp_path: Path) -> None:
    from inferplane.api.pipeline import Gateway
    from inferplane.ledger.memory import MemoryLedger

    path = tmp_path / "gw.db"
    gw = Gateway(parse_config(FLEET + f"gateway: {{ledger_path: {str(path)!r}}}\n"))
    assert isinstance(gw.ledger, SqliteLedger) and gw.ledger.path == path
    gw.ledger.close_sync()
    assert isinstance(Gateway(parse_config(FLEET)).ledger, MemoryLedger)


# -- explain ------------------------------------------------------------------------------------
def _explained(rec: Mapping[str, Any]) -> str:
    console = Console(record=True, width=200)
    print_decision(rec, console)
    return console.export_text()


def test_explain_renders_the_evidence(tmp_path: Path, decision: Decision) -> None:
    spilled = replace(
        decision,
        spillover=Spillover("saturated", "eu-h100-1", "eu-h100-0", "eu-west", "eu-west",
                            delta_ttft_s=0.02),
    )
    ledger = SqliteLedger(tmp_path / "l.db")
    ledger.record(spilled, Outcome(status=502, endpoint="eu-h100-1", error="reset"), 1.0)
    ledger.record(spilled, _ok(spilled, attempts=2, failed_endpoints=("eu-h100-1",)), 2.0)
    rec = ledger.get("d-1")
    ledger.close_sync()
    assert rec is not None
    text = _explained(rec)
    assert decision.endpoint is not None
    for needle in (
        "decision d-1", "status 200", "acme", "interactive", "1200", "500.0 ms", "eu-west",
        decision.endpoint, "h100", "reserved", "42.0 ms", "11.0 ms", "1180", "512",
        "$0.000321", "spillover: saturated", "failed endpoints: eu-h100-1", "status 502",
        "removed by model-served", "does not serve model", "eu-embed-0",
        "filter", "score", "pick", "µs",
    ):
        assert needle in text, needle
    for c in decision.candidates:  # every scorer of the policy shows up by name
        for scorer in c.scores:
            assert f"{scorer}=" in text, scorer
    picked = decision.picked
    assert picked is not None
    if picked.name == "eu-h100-0":
        assert "instruct" in text and "fp8" in text


def test_explain_renders_a_record_with_no_pick() -> None:
    rec = {"decision_id": "z", "tenant": "acme", "picked": None,
           "removed_by": {"jurisdiction": 3}, "outcome": {"status": 503}}
    text = _explained(rec)
    assert "no endpoint picked: removed by 3 jurisdiction" in text and "status 503" in text


def test_explain_cli(tmp_path: Path, decision: Decision) -> None:
    path = tmp_path / "l.db"
    ledger = SqliteLedger(path)
    ledger.record(decision, _ok(decision), 1.0)
    ledger.close_sync()
    runner = CliRunner()

    found = runner.invoke(app, ["explain", "d-1", "--ledger", str(path)])
    assert found.exit_code == 0, found.output
    assert "decision d-1" in found.output and "candidates" in found.output

    raw = runner.invoke(app, ["explain", "d-1", "--ledger", str(path), "--json"])
    assert raw.exit_code == 0
    assert orjson.loads(raw.stdout)["picked"]["endpoint"] == decision.endpoint

    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET + f"gateway: {{ledger_path: {str(path)!r}}}\n")
    via_config = runner.invoke(app, ["explain", "d-1", "--config", str(fleet), "--json"])
    assert via_config.exit_code == 0, via_config.output

    unknown = runner.invoke(app, ["explain", "nope", "--ledger", str(path)])
    assert unknown.exit_code == 1
    assert "no decision 'nope'" in unknown.output

    missing = runner.invoke(app, ["explain", "d-1", "--ledger", str(tmp_path / "x.db")])
    assert missing.exit_code == 2 and "no such ledger file" in missing.output
    neither = runner.invoke(app, ["explain", "d-1"])
    assert neither.exit_code == 2


async def test_lookup_reads_the_ledger_off_the_event_loop(
    tmp_path: Path, decision: Decision
) -> None:
    """`GET /v1/decisions/{id}` may wait on the SQLite writer's lock: it must not block the
    loop, so `lookup` reads in a worker thread."""
    import threading

    ledger = SqliteLedger(tmp_path / "l.db")
    readers: list[int] = []
    get = ledger.get

    def spy(decision_id: str) -> dict[str, Any] | None:
        readers.append(threading.get_ident())
        return get(decision_id)

    ledger.get = spy  # type: ignore[method-assign]
    ledger.record(decision, _ok(decision), 1.0)
    rec = await ledger.lookup("d-1")
    assert rec is not None and rec["decision_id"] == "d-1"
    assert readers and readers[0] != threading.get_ident()
    ledger.close_sync()


async def test_another_tenants_decision_and_an_unknown_one_get_the_same_404(
    decision: Decision,
) -> None:
    """No existence oracle (issue 12 item 7): 404 with the same body either way."""
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from inferplane.api.app import GATEWAY_KEY, error_middleware, get_decision
    from inferplane.api.pipeline import Gateway
    from tests.builders import key_hash

    cfg = parse_config(FLEET.replace(
        "tenants:\n", f'tenants:\n  - {{name: other, api_keys: ["{key_hash("k2")}"]}}\n'))
    gw = Gateway(cfg)
    gw.ledger.record(decision, _ok(decision), 1.0)  # tenant acme's
    application = web.Application()
    application[GATEWAY_KEY] = gw

    async def call(decision_id: str) -> web.StreamResponse:
        request = make_mocked_request(
            "GET", f"/v1/decisions/{decision_id}", headers={"Authorization": "Bearer k2"},
            match_info={"decision_id": decision_id}, app=application,
        )
        return await error_middleware(request, get_decision)

    theirs, unknown = await call("d-1"), await call("nope")
    assert theirs.status == unknown.status == 404
    assert theirs.body == unknown.body  # type: ignore[attr-defined]


async def test_the_memory_ledger_lists_like_the_others(decision: Decision) -> None:
    from inferplane.ledger.memory import MemoryLedger
    from inferplane.ledger.query import Query, decode_cursor

    led = MemoryLedger()
    receipts = [led.record(_with_id(decision, f"d-{i}"), _ok(decision), float(i))
                for i in range(7)]
    assert all(r.committed for r in receipts)
    page = await led.query(Query(tenant="acme", since=1.0, until=6.0, limit=2))
    got = [it["record"]["decision_id"] for it in page.items]
    while page.next_cursor:
        page = await led.query(Query(tenant="acme", since=1.0, until=6.0, limit=2,
                                     after=decode_cursor(page.next_cursor)))
        got += [it["record"]["decision_id"] for it in page.items]
    assert got == ["d-1", "d-2", "d-3", "d-4", "d-5"]
    assert (await led.query(Query(tenant="other"))).items == []
    first = (await led.query(Query(tenant="acme", limit=1))).items[0]
    assert first["receipt"] == receipts[0].hash
    assert (await led.lookup("d-3")) is not None


def test_a_candidate_record_is_written_with_every_field() -> None:
    """`_plain` spells out `CandidateRecord`'s fields (the hot path): none may be missing."""
    c = CandidateRecord("e", "s", "f", "why", {"x": 1.0}, 0.5, {"y": 2.0})
    assert _plain(c) == dataclasses.asdict(c)


def test_a_decisions_evidence_is_encoded_as_its_records() -> None:
    """`place` keeps the candidates' records unbuilt (`Evidence`) and the ledger encodes them
    from what it kept: the same bytes as the built records (removed endpoints included), and
    `candidate` builds the one asked for equal to its built record."""
    d = _placed()
    evidence = d.candidates
    assert isinstance(evidence, Evidence) and d.removed_by
    o = _ok(d)
    text = encode_entry(d, o, 1.0).text  # before anything built the records
    records = tuple(evidence)  # built now
    assert len(records) == len(evidence) == 3
    again = _placed()  # the same decision again, its records asked for one by one
    assert tuple(again.candidate(r.endpoint) for r in records) == records
    assert encode_entry(replace(d, candidates=records), o, 1.0).text == text
    assert evidence == records and list(evidence) == list(records)
    with pytest.raises(KeyError):
        d.candidate("nowhere")


def test_a_candidate_read_again_is_the_same_record_and_encodes_the_same() -> None:
    """`Decision.candidate` keeps the record it built (the gateway reads the pick's three or
    four times a request): asked again it is the same object, the sequence built later holds
    it, and the decision encodes to the same bytes before and after the reads."""
    d = _placed()
    o = _ok(d)
    text = encode_entry(d, o, 1.0).text  # before anything was read
    assert d.picked is not None
    pick = d.picked.name
    first = d.candidate(pick)
    assert d.candidate(pick) is first and d.candidate(pick) is first
    assert encode_entry(d, o, 1.0).text == text  # the pick read, nothing else built
    # the others (a removed endpoint and another scored one), named by the same decision again
    others = [r.endpoint for r in _placed().candidates if r.endpoint != pick]
    assert len(others) == 2
    kept = {n: d.candidate(n) for n in others}
    assert all(d.candidate(n) is r for n, r in kept.items())
    assert encode_entry(d, o, 1.0).text == text
    records = tuple(d.candidates)  # the sequence built now holds the records read
    assert next(r for r in records if r.endpoint == pick) is first
    assert all(next(r for r in records if r.endpoint == n) is kept[n] for n in kept)
    assert d.candidate(pick) is first
    assert encode_entry(d, o, 1.0).text == text
    assert encode_entry(replace(d, candidates=records), o, 1.0).text == text


async def test_answers_do_not_wait_while_the_ledgers_store_is_down(
    tmp_path: Path, decision: Decision, caplog: pytest.LogCaptureFixture
) -> None:
    """audit27 F2a/F2c: once a write failed and none has committed since, an answer does not
    wait commit_timeout_s for its record (counted as a commit timeout), and when writes work
    again one line says so, with how long the store was down and how much was written."""
    import logging

    from inferplane.api.pipeline import Gateway

    cfg = parse_config(FLEET + "ledger: {commit_timeout_s: 3600}\n")
    led = FailingLedger(tmp_path / "down.db", batch_size=10)
    gw = Gateway(cfg, ledger=led)
    first = led.record(_with_id(decision, "a-0"), _ok(decision), 1.0)
    assert led.flush() is False and led.store_down
    before = gw.metrics.ledger_commit_timeouts._value.get()
    later = led.record(_with_id(decision, "a-1"), _ok(decision), 2.0)
    async with asyncio.timeout(60):  # without the fix: waits commit_timeout_s (an hour)
        assert await gw.committed(later) is False
    assert gw.metrics.ledger_commit_timeouts._value.get() == before + 1
    led.failing = False
    with caplog.at_level(logging.INFO, logger="inferplane.ledger"):
        assert led.flush() and not led.store_down
    resumed = [r.getMessage() for r in caplog.records if "writes resumed" in r.getMessage()]
    assert len(resumed) == 1 and "2 records written since the outage began" in resumed[0]
    assert await first.durable(1.0) and await later.durable(1.0)
    led.close_sync()


def test_the_shard_can_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """audit27 F11: one ConfigMap, one shard per pod (ledger.shard_env: POD_NAME)."""
    from inferplane.ledger.build import build_ledger, ledger_problems

    cfg = parse_config(FLEET + f"gateway: {{ledger_path: {str(tmp_path / 's.db')!r}}}\n"
                       "ledger: {shard: main, shard_env: POD_NAME}\n")
    monkeypatch.setenv("POD_NAME", "inferplane-gateway-7d9f-x2k4q")
    led = build_ledger(cfg, "fleet.yaml")
    assert isinstance(led, SqliteLedger) and led.shard == "inferplane-gateway-7d9f-x2k4q"
    led.close_sync()
    monkeypatch.delenv("POD_NAME")
    with pytest.raises(ConfigError, match=r"ledger\.shard_env"):
        build_ledger(cfg, "fleet.yaml")
    assert [f for f, _ in ledger_problems(cfg, "fleet.yaml")] == ["ledger.shard_env"]
    monkeypatch.setenv("POD_NAME", "bad name")
    with pytest.raises(ConfigError, match="not a shard name"):
        build_ledger(cfg, "fleet.yaml")


def test_the_k8s_example_fleet_parses_with_a_signed_per_pod_ledger() -> None:
    import yaml

    root = Path(__file__).resolve().parent.parent
    doc = yaml.safe_load((root / "deploy/k8s/fleet-configmap.yaml").read_text())
    cfg = parse_config(doc["data"]["fleet.yaml"])
    assert cfg.ledger.signing_key_env and cfg.ledger.shard_env == "POD_NAME"
    assert cfg.ledger.spool_path


async def test_the_ledgers_outage_and_spool_are_on_the_metrics_page(
    tmp_path: Path, decision: Decision
) -> None:
    """review27 should 5: with a spool, answers during an outage are settled (no commit
    timeout is counted), so nothing on /metrics showed the ledger down or its spool growing."""
    from inferplane.api.pipeline import Gateway
    from inferplane.ledger.postgres import PostgresLedger
    from inferplane.ledger.record import encode_entry
    from inferplane.ledger.spool import Spool

    cfg = parse_config(FLEET)
    led = FailingLedger(tmp_path / "down.db", batch_size=10)
    gw = Gateway(cfg, ledger=led)
    assert b"inferplane_ledger_store_down 0.0" in gw.metrics_page()
    led.record(_with_id(decision, "a-0"), _ok(decision), 1.0)
    assert led.flush() is False
    page = gw.metrics_page()
    assert b"inferplane_ledger_store_down 1.0" in page
    assert b"inferplane_ledger_spooled_records 0.0" in page
    led.failing = False
    assert led.flush()
    assert b"inferplane_ledger_store_down 0.0" in gw.metrics_page()
    led.close_sync()

    spool = Spool(tmp_path / "spool.sqlite")
    spool.add([encode_entry(_with_id(decision, f"s-{i}"), _ok(decision), float(i))
               for i in range(3)])
    spool.close()
    pg = PostgresLedger("postgresql://postgres@127.0.0.1:9/test",
                        spool_path=str(tmp_path / "spool.sqlite"))  # never started
    gw2 = Gateway(cfg, ledger=pg)
    assert b"inferplane_ledger_spooled_records 3.0" in gw2.metrics_page()


def test_spool_lookups_use_an_index(tmp_path: Path) -> None:
    """review27 should 4: ``Spool.texts`` (GET /v1/decisions/{id} during an outage) scanned
    the whole file under the spool's lock; a file made before the index gets it on open."""
    from inferplane.ledger.spool import Spool

    path = tmp_path / "old-spool.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE spooled (id INTEGER PRIMARY KEY AUTOINCREMENT, decision_id "
                     "TEXT NOT NULL, at_unix REAL NOT NULL, tenant TEXT NOT NULL, endpoint TEXT, "
                     "workload_class TEXT, model TEXT, substrate TEXT, status INTEGER, ttft_s "
                     "REAL, cost_usd REAL, record TEXT NOT NULL, receipt TEXT NOT NULL)")
    Spool(path).close()
    with sqlite3.connect(path) as conn:
        plan = " ".join(str(r[-1]) for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT record FROM spooled WHERE decision_id = ? ORDER BY id",
            ("d-1",)))
    assert "spooled_by_decision" in plan, plan

