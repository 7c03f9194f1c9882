"""The local admission store (a SQLite file) when its file stops taking writes (audit26 M2):
spend and usage settled meanwhile are kept pending and written once it takes writes again, a
budgeted tenant gets 503 ``store_unavailable`` with Retry-After (as with the Redis store in an
outage), never a 500, and the log says so once, not once per request.

The outage is a real SQLite write refusal on the store's own connection (``PRAGMA
query_only``: "attempt to write a readonly database", the error class of a file made
read-only or a full disk), so no root is needed to mount a tiny filesystem. The gateway runs in
this process, in front of a fake upstream, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from inferplane.admission import sqlite_state
from inferplane.admission.sqlite_state import SqliteStore
from inferplane.admission.state import SEP, CounterDemand, StoreHealth
from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from tests.support.fake_upstream import build
from tests.support.procs import free_port
from tests.test_admission_integration import CHAT, KEYS, config


async def _read_only(store: SqliteStore, on: bool) -> None:
    """Make the store's connection refuse writes (or take them again)."""

    def flip() -> None:
        if store._conn is None:
            store._conn = store._open()
        store._conn.execute(f"PRAGMA query_only = {1 if on else 0}")

    await asyncio.get_running_loop().run_in_executor(store._pool, flip)


async def _until(cond: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Gateway, str]]:
    up = free_port()
    upstream = web.AppRunner(build("up", "fast", 0.0))
    await upstream.setup()
    await web.TCPSite(upstream, "127.0.0.1", up).start()
    port = free_port()
    yaml = config(port, up, {"path": str(tmp_path / "adm.sqlite"),
                             "outage_retry_after_s": 0.2})
    gw = Gateway(parse_config(yaml, "f.yaml"))
    runner = await serve(gw, "127.0.0.1", port)
    try:
        yield gw, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await upstream.cleanup()


async def _chat(s: aiohttp.ClientSession, base: str, who: str) -> tuple[int, dict[str, Any],
                                                                        dict[str, str]]:
    async with s.post(f"{base}/v1/chat/completions", json={**CHAT, "max_tokens": 10},
                      headers={"Authorization": f"Bearer {KEYS[who]}"}) as r:
        return r.status, await r.json(), dict(r.headers)


async def _usage(s: aiohttp.ClientSession, base: str, who: str) -> tuple[int, dict[str, Any]]:
    async with s.get(f"{base}/v1/usage",
                     headers={"Authorization": f"Bearer {KEYS[who]}"}) as r:
        return r.status, await r.json()


def _requests(body: dict[str, Any]) -> int:
    return sum(int(row["requests"]) for row in body["data"])


async def test_an_unwritable_store_fails_budgets_closed_and_loses_no_spend(
    gateway: tuple[Gateway, str], caplog: pytest.LogCaptureFixture
) -> None:
    gw, base = gateway
    store = gw.admission.store
    assert isinstance(store, SqliteStore)
    caplog.set_level(logging.INFO)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        for who in ("plain", "budget"):
            assert (await _chat(s, base, who))[0] == 200
        await _until(lambda: not gw.admission._tasks)  # both settles written

        await _read_only(store, True)
        # a tenant without a budget is served; its spend and usage wait in memory
        for _ in range(3):
            status, body, _ = await _chat(s, base, "plain")
            assert status == 200, body
        # a budget that cannot be checked admits nothing: 503 + Retry-After, not a 500
        status, body, headers = await _chat(s, base, "budget")
        assert status == 503, body
        assert body["error"]["code"] == "store_unavailable", body
        assert "cannot be written" in body["error"]["message"]
        assert headers["Retry-After"] == "1"
        # a usage report that would leave out the pending updates is refused the same way
        status, body = await _usage(s, base, "plain")
        assert status == 503 and body["error"]["code"] == "store_unavailable", body
        assert store.backlog >= 1  # the three usage updates, merged per group

        await _read_only(store, False)  # the disk has room again: the retry writes them
        await _until(lambda: not store.backlog and store.down_since is None)
        status, body = await _usage(s, base, "plain")
        assert status == 200, body
        assert _requests(body) == 4, body  # the one before and the three during the outage
        assert (await _chat(s, base, "budget"))[0] == 200

    text = caplog.text
    assert "Traceback" not in text and "settle failed" not in text, text
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "cannot be written" in errors[0].getMessage(), errors
    assert any("writable again" in r.getMessage() for r in caplog.records)


async def _store_gauges(s: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """The admission store's families on the gateway's /metrics page, read over HTTP."""
    async with s.get(f"{base}/metrics") as r:
        assert r.status == 200
        page = await r.text()
    out = {}
    for family in text_string_to_metric_families(page):
        if family.name.startswith("inferplane_admission_store_"):
            for sample in family.samples:
                if not sample.name.endswith("_created"):
                    key = sample.name + "".join(f":{v}" for v in sample.labels.values())
                    out[key] = sample.value
    return out


async def test_the_store_outage_and_its_backlog_are_on_the_metrics_page(
    gateway: tuple[Gateway, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """harden27: an operator can alert on an outage of the store's file and on the spend
    waiting for it (docs/metrics.md, Admission store outages); a scrape asks the store for its
    health once (review27 S4: the counters read its totals as they are)."""
    gw, base = gateway
    store = gw.admission.store
    assert isinstance(store, SqliteStore)
    up = {"inferplane_admission_store_up": 1.0,
          "inferplane_admission_store_outage_seconds": 0.0,
          "inferplane_admission_store_pending:settle": 0.0,
          "inferplane_admission_store_pending:usage": 0.0,
          "inferplane_admission_store_outages_total": 0.0,
          "inferplane_admission_store_dropped_total": 0.0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        assert (await _chat(s, base, "plain"))[0] == 200
        await _until(lambda: not gw.admission._tasks)
        assert await _store_gauges(s, base) == up

        await _read_only(store, True)
        for _ in range(3):
            assert (await _chat(s, base, "plain"))[0] == 200
        await _until(lambda: not gw.admission._tasks)
        await asyncio.sleep(0.05)
        asked: list[StoreHealth] = []

        def health(*args: Any, **kwargs: Any) -> StoreHealth:
            asked.append(StoreHealth(*args, **kwargs))
            return asked[-1]

        monkeypatch.setattr(sqlite_state, "StoreHealth", health)
        down = await _store_gauges(s, base)
        assert len(asked) == 1
        assert down["inferplane_admission_store_up"] == 0.0, down
        assert down["inferplane_admission_store_outage_seconds"] > 0.0, down
        assert down["inferplane_admission_store_pending:settle"] == len(store.pending), down
        assert down["inferplane_admission_store_pending:usage"] == len(store.pending_usage) == 1
        assert down["inferplane_admission_store_outages_total"] == 1.0, down

        await _read_only(store, False)
        await _until(lambda: not store.backlog and store.down_since is None)
        assert await _store_gauges(s, base) == {
            **up, "inferplane_admission_store_outages_total": 1.0}


async def test_pending_updates_are_written_in_order_before_the_next_check(
    tmp_path: Path,
) -> None:
    """Store level: a settle during the outage is not lost, and the next budget check sees
    it (written first) once the file takes writes again, without waiting for the retry."""
    s = SqliteStore(tmp_path / "adm.sqlite", retry_after_s=3600.0)  # no background retry here
    d = CounterDemand("c", 1.0, None, 0.5, 0, 3600.0)
    await s.ping()
    assert await s.reserve([d], "a", 100.0, 0.0) == -1
    await _read_only(s, True)
    await s.settle([d], "a", 0.75, 0, 1.0)  # no exception: kept pending
    await s.add_usage("t", ("d", "wf", "m", "c", "k"), 0.75, 1, 2)
    assert len(s.pending) == 1 and len(s.pending_usage) == 1
    with pytest.raises(Exception) as info:
        await s.reserve([d], "b", 100.0, 2.0)
    assert getattr(info.value, "code", None) == "store_unavailable"
    await _read_only(s, False)
    assert await s.reserve([d], "b", 100.0, 2.0) == 0  # $0.75 spent + $0.5 > $1: refused
    assert not s.backlog
    st = await s.counter("c", 3.0)
    assert (st.spent_usd, st.reserved_usd) == (0.75, 0.0)
    rows = await s.usage("t")
    assert rows[0].requests == 1 and rows[0].completion_tokens == 2
    await s.close()


async def test_concurrent_retries_write_each_pending_update_once(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "adm.sqlite", retry_after_s=3600.0)
    await s.ping()
    await _read_only(s, True)
    for _ in range(3):
        await s.add_usage("t", ("d", "wf", "m", "c", "k"), 0.5, 1, 1)
    await _read_only(s, False)
    await asyncio.gather(s._flush(), s._flush(), s.usage("t"), s.counter("x", 0.0))
    rows = await s.usage("t")
    assert rows[0].requests == 3 and rows[0].usd == 1.5
    await s.close()


async def _held_flush(tmp_path: Path) -> tuple[SqliteStore, threading.Event, threading.Event]:
    """A store with one usage update pending, writable again, whose next flush blocks on the
    store's thread (inside its transaction) until ``release`` is set; ``started`` tells when."""
    s = SqliteStore(tmp_path / "adm.sqlite", retry_after_s=3600.0)
    await s.ping()
    await _read_only(s, True)
    await s.add_usage("t", ("d", "wf", "m", "c", "k"), 0.5, 1, 1)
    await _read_only(s, False)
    started, release = threading.Event(), threading.Event()

    def block(c: Any) -> None:
        started.set()
        release.wait(30)

    s.pending.appendleft(block)
    return s, started, release


async def test_a_caller_cancelled_mid_flush_does_not_write_the_pending_update_twice(
    tmp_path: Path,
) -> None:
    """review26 M-a: a request cancelled while its check flushes (a client that disconnects)
    must not leave the committed updates pending, to be written again by the next flush."""
    s, started, release = await _held_flush(tmp_path)
    first = asyncio.create_task(s.usage("t"))
    await _until(started.is_set)
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    release.set()
    rows = await s.usage("t")  # flushes again (or waits for the flush still running)
    assert not s.pending
    assert rows[0].requests == 1 and rows[0].usd == 0.5
    await s.close()


async def test_close_during_a_retry_waits_for_it_and_writes_each_update_once(
    tmp_path: Path,
) -> None:
    s, started, release = await _held_flush(tmp_path)
    assert s._retrier is not None
    s._retrier.cancel()  # the long-sleeping retrier; one that flushes at once instead
    s.retry_after_s = 0.0
    s._retrier = None
    s._ensure_retrier()
    await _until(started.is_set)
    closing = asyncio.create_task(s.close())
    await asyncio.sleep(0)
    release.set()
    await closing
    again = SqliteStore(tmp_path / "adm.sqlite")
    rows = await again.usage("t")
    assert rows[0].requests == 1 and rows[0].usd == 0.5
    await again.close()


async def test_pending_usage_is_merged_per_group_and_settles_are_capped(tmp_path: Path) -> None:
    """review26 S-d: what waits during an outage is bounded: usage updates merge per tenant
    and group (none lost), settles beyond the cap are dropped and counted."""
    s = SqliteStore(tmp_path / "adm.sqlite", retry_after_s=3600.0)
    s.max_pending_settles = 2
    d = CounterDemand("c", 100.0, None, 0.5, 0, 3600.0)
    await s.ping()
    assert await s.reserve([d], "l0", 100.0, 0.0) == -1
    await _read_only(s, True)
    for _ in range(50):
        await s.add_usage("t", ("d", "wf", "m", "c", "k"), 0.5, 1, 2)
        await s.add_usage("t", ("d", "wf", "m2", "c", "k"), 0.25, 1, 1)
    for i in range(3):
        await s.settle([d], f"l{i}", 0.5, 0, 1.0)
    assert len(s.pending_usage) == 2 and len(s.pending) == 2 and s.dropped == 1
    await _read_only(s, False)
    rows = {r.group[2]: r for r in await s.usage("t")}
    assert rows["m"].requests == 50 and rows["m"].usd == 25.0 and rows["m"].completion_tokens == 100
    assert rows["m2"].requests == 50 and rows["m2"].usd == 12.5
    assert (await s.counter("c", 2.0)).spent_usd == 1.0  # the two kept settles
    assert not s.backlog
    await s.close()


async def test_an_update_that_cannot_apply_does_not_jam_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """review26 S-e: a pending update failing with IntegrityError is dropped and said; the
    others are written and the store answers. A damaged file (DatabaseError) is an outage:
    503 and kept, never a 500."""
    s = SqliteStore(tmp_path / "adm.sqlite", retry_after_s=3600.0)
    await s.ping()
    await _read_only(s, True)
    await s.add_usage("t", ("d", "wf", "m", "c", "k"), 0.5, 1, 1)
    await _read_only(s, False)

    def bad(c: Any) -> None:
        raise sqlite3.IntegrityError("UNIQUE constraint failed: leases.counter")

    def ok(c: Any) -> None:
        c.execute("INSERT INTO usage VALUES ('t', 'x', 0, 0, 0, 7)")

    s.pending.extend([bad, ok])
    rows = {r.group[0]: r.requests for r in await s.usage("t")}
    assert rows == {"d": 1, "x": 7} and not s.backlog and s.dropped == 1
    assert any("could not be applied" in r.getMessage() for r in caplog.records)

    def damaged(c: Any) -> None:
        raise sqlite3.DatabaseError("database disk image is malformed")

    s.pending.append(damaged)
    with pytest.raises(Exception) as info:
        await s.usage("t")
    assert getattr(info.value, "code", None) == "store_unavailable"
    assert list(s.pending) == [damaged]
    s.pending.clear()
    await s.close()


async def test_merged_usage_stays_pending_until_its_flush_commits(tmp_path: Path) -> None:
    """While a flush of merged usage is on its way, the rows still count as pending: a read
    waits for them, an update that comes meanwhile stays behind them, and each is written
    once."""
    s = SqliteStore(tmp_path / "adm.sqlite", retry_after_s=3600.0)
    await s.ping()
    await _read_only(s, True)
    await s.add_usage("t", ("d", "wf", "m", "c", "k"), 0.5, 1, 1)
    await _read_only(s, False)
    release = threading.Event()
    busy = asyncio.get_running_loop().run_in_executor(s._pool, release.wait, 30)
    flushing = asyncio.create_task(s._flush())
    for _ in range(5):
        await asyncio.sleep(0)
    assert s._flush_task is not None and not s._flush_task.done()
    assert s.backlog == 1  # not yet written: still pending
    await s.add_usage("t", ("d", "wf", "m", "c", "k"), 0.5, 1, 1)  # waits behind it
    assert s.pending_usage[("t", SEP.join(("d", "wf", "m", "c", "k")))][3] == 2
    release.set()
    await busy
    assert await flushing
    rows = await s.usage("t")
    assert rows[0].requests == 2 and rows[0].usd == 1.0 and not s.backlog
    await s.close()
