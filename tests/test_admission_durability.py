"""The embedded admission store is durable: budgets and usage in SQLite survive a restart and a
kill -9 of the gateway (issue 12 item 8: a 19-request budget used to admit 57 across three
restarts)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferplane.admission.controller import local_store_path, make_store
from inferplane.admission.sqlite_state import SqliteStore
from inferplane.admission.state import CounterDemand, MemoryStore, WorkflowCap
from inferplane.config.loader import parse_config
from tests.builders import model, pool_fleet, to_yaml
from tests.support.procs import Proc, free_port
from tests.test_admission_integration import CHAT, KEYS, config, upstream

__all__ = ["upstream"]  # the fake upstream fixture, shared with the admission tests


async def test_sqlite_counters_leases_and_usage_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "adm.sqlite"
    s = SqliteStore(path)
    d = CounterDemand("c", 1.0, 10, 0.6, 4, 3600.0)
    assert await s.reserve([d], "a", 100.0, 0.0) == -1
    assert await s.reserve([d], "b", 199.0, 99.0) == 0  # $0.6 reserved + $0.6 > $1
    assert await s.reserve([d], "b", 200.0, 100.0) == -1  # lease "a" expired at 100
    await s.settle([d], "b", 0.25, 3, 101.0)
    await s.add_usage("t", ("d", "wf", "m", "c", "k"), 0.5, 7, 5)
    await s.add_usage("t", ("d", "wf", "m", "c", "k"), 0.25, 7, 5)
    assert await s.reserve([d], "c", 300.0, 102.0) == -1  # held across the reopen
    await s.close()

    s = SqliteStore(path)  # a new process would see the same
    st = await s.counter("c", 103.0)
    assert (st.spent_usd, st.spent_tokens, st.reserved_usd, st.reserved_tokens) == (
        0.25, 3, 0.6, 4)
    assert await s.reserve([d], "d", 400.0, 103.0) == 0  # 0.25 + 0.6 + 0.6 > 1
    d_tokens = CounterDemand("c", None, 11, 0.0, 4, 3600.0)
    assert await s.reserve([d_tokens], "d", 400.0, 103.0) == -1  # 3 + 4 + 4 <= 11
    assert await s.reserve([d_tokens], "e", 400.0, 103.0) == 0  # 3 + 8 + 4 > 11
    rows = await s.usage("t")
    assert len(rows) == 1 and rows[0].requests == 2 and rows[0].usd == 0.75
    assert rows[0].group == ("d", "wf", "m", "c", "k")
    assert await s.usage("nobody") == []
    # the counter's window ends: everything in it is forgotten
    assert await s.counter("c", 103.0 + 3600.0 + 1) == (await MemoryStore().counter("x", 0))
    await s.close()


def test_store_choice_follows_the_config(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite"
    cases: list[tuple[dict[str, Any], str | None]] = [
        ({}, None),  # no ledger file, no path: in memory
        ({"gateway": {"ledger_path": str(ledger)}}, f"{ledger}.admission.sqlite"),
        ({"admission": {"path": f"{tmp_path}/a.sqlite"}}, f"{tmp_path}/a.sqlite"),
        ({"gateway": {"ledger_path": str(ledger)}, "admission": {"store": "memory"}}, None),
    ]
    for sections, want in cases:
        cfg = parse_config(to_yaml(pool_fleet(
            9, substrate={"name": "s", "region": "r", "cost": {"hourly_usd": 1.0}},
            models=[model(max_context=4096)], **sections)), "f.yaml")
        assert local_store_path(cfg) == want
        store = make_store(cfg)
        assert isinstance(store, SqliteStore if want else MemoryStore)


@pytest.mark.parametrize("store", ["memory", "local"])
async def test_the_local_stores_cap_a_days_workflows_as_redis_does(
    tmp_path: Path, store: str,
) -> None:
    """``admission.usage_max_workflows`` applies to the memory and SQLite stores as to Redis
    (`tests/test_redis_start.py`): a tenant's day keeps its first N workflow ids, the others
    count under ``(other)``, a group without a workflow is not capped, another tenant or day
    has its own N; the SQLite store keeps the cap across a restart (it reads the day's ids from
    its file). Before edge28 both kept every workflow id."""
    cfg = parse_config(to_yaml(pool_fleet(
        9, substrate={"name": "s", "region": "r", "cost": {"hourly_usd": 1.0}},
        models=[model(max_context=4096)],
        admission={"store": store, "path": f"{tmp_path}/a.sqlite", "usage_max_workflows": 2},
    )), "f.yaml")
    s = make_store(cfg)
    day, rest = "2026-12-07", ("m", "interactive", "k")
    for wf in ["a", "b", "c", "d", "a", ""]:
        await s.add_usage("acme", (day, wf, *rest), 0.5, 1, 2)
    await s.add_usage("other-tenant", (day, "z", *rest), 0.5, 1, 2)
    await s.add_usage("acme", ("2026-12-08", "e", *rest), 0.5, 1, 2)
    rows = {(r.group[0], r.group[1]): r.requests for r in await s.usage("acme")}
    assert rows == {(day, "a"): 2, (day, "b"): 1, (day, "(other)"): 2, (day, ""): 1,
                    ("2026-12-08", "e"): 1}
    assert [r.group[1] for r in await s.usage("other-tenant")] == ["z"]
    await s.close()
    if store == "local":  # a restarted gateway: the day's two ids are still its two
        again = make_store(cfg)
        await again.add_usage("acme", (day, "f", *rest), 0.5, 1, 2)
        await again.add_usage("acme", (day, "b", *rest), 0.5, 1, 2)
        rows = {(r.group[0], r.group[1]): r.requests for r in await again.usage("acme")}
        assert rows[(day, "(other)")] == 3 and rows[(day, "b")] == 2
        assert (day, "f") not in rows
        await again.close()


def test_workflow_cap_keeps_two_days_and_none_means_no_cap() -> None:
    cap = WorkflowCap(1)
    for day in ("2026-12-05", "2026-12-06", "2026-12-07"):
        assert cap.group("t", (day, "a", "m")) == (day, "a", "m")
        assert cap.group("t", (day, "b", "m")) == (day, "(other)", "m")
    assert sorted(cap._days["t"]) == ["2026-12-06", "2026-12-07"]  # the older ones go
    free = WorkflowCap(None)
    assert [free.group("t", ("d", w)) for w in "abc"] == [("d", "a"), ("d", "b"), ("d", "c")]


def test_workflow_cap_seed_of_a_dropped_day_is_not_marked_seeded() -> None:
    """A late update of a day older than the two kept: the seed of its ids is dropped with
    the day, and the day is not marked seeded (it was: seeded with no ids, for good)."""
    cap = WorkflowCap(1)
    cap.seed("t", "2026-12-06", ["a"])
    cap.seed("t", "2026-12-07", ["b"])
    cap.seed("t", "2026-12-05", ["c"])
    assert not cap.seeded("t", "2026-12-05") and cap._seeded == {
        ("t", "2026-12-06"), ("t", "2026-12-07")}
    assert sorted(cap._days["t"]) == ["2026-12-06", "2026-12-07"]
    assert cap.group("t", ("2026-12-06", "x")) == ("2026-12-06", "(other)")


async def test_late_updates_of_a_dropped_day_do_not_re_read_its_usage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dropped day is never marked seeded, so each late update of it would read the day's
    usage rows from the file again; the store skips the seed for a day the cap drops."""
    s = SqliteStore(tmp_path / "adm.sqlite", max_workflows=1)
    reads: list[str] = []
    real = s._seed_workflows

    async def counted(tenant: str, day: str) -> None:
        reads.append(day)
        await real(tenant, day)

    monkeypatch.setattr(s, "_seed_workflows", counted)
    try:
        await s.add_usage("t", ("2026-12-06", "a", "m", "c", "k"), 0.1, 1, 1)
        await s.add_usage("t", ("2026-12-07", "b", "m", "c", "k"), 0.1, 1, 1)
        assert reads == ["2026-12-06", "2026-12-07"]
        for _ in range(3):  # late updates of a day older than the two kept
            await s.add_usage("t", ("2026-12-05", "c", "m", "c", "k"), 0.1, 1, 1)
        assert reads == ["2026-12-06", "2026-12-07"], reads
        assert {tuple(r.group) for r in await s.usage("t")} >= {
            ("2026-12-05", "c", "m", "c", "k")}
    finally:
        await s.close()
    assert WorkflowCap(1).dropped("t", "2026-12-05") is False  # no days kept yet


def test_budget_holds_across_kill_9_and_restart(
    tmp_path: Path, upstream: int
) -> None:
    """$0.1 a day, $0.012 actual and $0.013 reserved per request: 8 fit. Killing the gateway
    with SIGKILL twice, right after answers, must not let a single extra request in."""
    port = free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(config(port, upstream, {"path": f"{tmp_path}/adm.sqlite"}))
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {KEYS['budget']}"}
    statuses: list[int] = []
    for run, n in enumerate((3, 3, 6)):
        gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg)], tmp_path / f"{run}.log")
        try:
            gw.wait_http(f"{base}/ready")
            for _ in range(n):
                r = httpx.post(f"{base}/v1/chat/completions", json={**CHAT, "max_tokens": 10},
                               headers=auth, timeout=10)
                statuses.append(r.status_code)
            gw.p.kill()  # SIGKILL: no clean-up runs
            gw.p.wait(5)
        finally:
            gw.stop()
        assert "Traceback" not in gw.log.read_text()
    admitted = statuses.count(200)
    assert set(statuses) == {200, 429}, statuses
    # 8 when every settle landed before its kill; 7 when one was still a $0.013 reservation
    assert admitted in (7, 8), statuses
    assert statuses[admitted:] == [429] * (len(statuses) - admitted), statuses


@pytest.mark.parametrize("bad", ["/proc/no/such/dir/adm.sqlite"])
async def test_unwritable_path_fails_at_start(bad: str) -> None:
    s = SqliteStore(bad)
    with pytest.raises(sqlite3.OperationalError):  # the folder is never created (harden27)
        await s.ping()
    await s.close()
