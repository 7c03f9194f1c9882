"""Redis unreachable (issue 12 item 9): never a 500. Budgets fail closed with 503 + Retry-After,
everything else goes on locally, settles and usage are journaled and replayed, so no spend is
lost. Each test starts (and pauses or kills) its own redis-server."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from inferplane.admission.journal import OutageJournal
from inferplane.admission.outage import OutageStore
from inferplane.admission.redis_state import RedisStore
from inferplane.admission.state import BucketDemand, CounterDemand
from inferplane.errors import StoreUnavailableError
from tests.builders import pool_fleet, tenant, to_yaml
from tests.support.procs import Proc, free_port
from tests.support.redis_server import RedisServer
from tests.test_admission_integration import PRICED_UPSTREAM

NOW = 1_700_000_000.0
GROUP = ("2023-11-14", "", "m", "interactive", "k")


async def _until(cond: object, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


class _Unread(deque[Any]):
    """A journal that may be counted but not walked (it grows for as long as an outage)."""

    def __iter__(self) -> Iterator[Any]:
        raise AssertionError("the journal was walked")


@pytest.mark.parametrize("how", ["pause", "kill"])
async def test_outage_store_degrades_then_replays(tmp_path: Path, how: str) -> None:
    srv = RedisServer(tmp_path)
    store = OutageStore(RedisStore(srv.url, "t:", timeout_s=0.3), retry_after_s=0.3)
    try:
        d = CounterDemand("c", 1.0, None, 0.2, 0, 3600.0)
        assert await store.reserve([d], "a", NOW + 600, NOW) == -1
        if how == "pause":
            srv.pause()
        else:
            srv.p.kill()
            srv.p.wait(5)
        with pytest.raises(StoreUnavailableError) as err:
            await store.reserve([d], "b", NOW + 600, NOW)
        assert err.value.status == 503 and err.value.headers == {"Retry-After": "1"}
        assert not store.up
        await store.settle([d], "a", 0.15, 5, NOW)  # journaled, not lost
        await store.add_usage("t", GROUP, 0.15, 3, 2)
        assert len(store.journal) == 3  # with the give-back of the timed-out reserve "b"
        journal = store.journal
        store.journal = _Unread(journal)  # health() keeps counts: never walks the journal
        health = store.health()  # what /metrics shows (harden27; review27 S4)
        store.journal = journal
        assert (health.up, health.pending_settles, health.pending_usage, store.outages) == (
            False, 2, 1, 1)
        # local fallbacks: retry markers, loop counters, rate limits
        assert not await store.marked("k", NOW)
        await store.mark("k", 10, NOW)
        assert await store.marked("k", NOW)
        assert await store.incr("i", 10, NOW) == 1
        bucket = BucketDemand("b", 1, 1 / 60, 1)
        assert await store.take([bucket], NOW) == 0 and await store.take([bucket], NOW) > 0
        with pytest.raises(StoreUnavailableError):
            await store.usage("t")
        if how == "kill":
            return  # its data is gone with it; the replay is checked on the paused server
        srv.resume()
        await _until(lambda: store.up and not store.journal)
        health = store.health()
        assert (health.up, health.down_for_s, health.pending_settles, health.pending_usage) == (
            True, 0.0, 0, 0)
        st = await store.counter("c", NOW)
        assert (st.spent_usd, st.spent_tokens, st.reserved_usd) == (0.15, 5, 0.0)
        rows = await store.usage("t")
        assert [(r.group, r.usd, r.requests) for r in rows] == [(GROUP, 0.15, 1)]
        assert await store.reserve([d], "c", NOW + 600, NOW) == -1  # in service again
    finally:
        await store.close()
        srv.stop()


async def test_the_reachable_again_line_counts_its_own_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """'reachable again after N s; M journaled updates replayed' counts the updates of that
    outage (it counted every outage of the process: the second said 2 for its 1)."""
    srv = RedisServer(tmp_path)
    store = OutageStore(RedisStore(srv.url, "t:", timeout_s=0.3), retry_after_s=0.3)
    try:
        assert await store.ping()
        for _ in range(2):
            srv.pause()
            await store.add_usage("t", GROUP, 0.15, 3, 2)  # fails, journaled
            assert not store.up and len(store.journal) == 1
            srv.resume()
            await _until(lambda: store.up and not store.journal)
    finally:
        await store.close()
        srv.stop()
    back = [m for m in caplog.messages if "reachable again" in m]
    assert len(back) == 2 and all("; 1 journaled updates replayed" in m for m in back), back
    assert store.replayed == 2 and store.outages == 2


async def test_settle_sent_during_a_pause_counts_once(tmp_path: Path) -> None:
    """A settle and a usage update sent while Redis is paused time out and are journaled;
    Redis also runs the buffered commands when it resumes. Each is applied once (its settle id
    is remembered), however often it arrives (issue 12 item 9)."""
    srv = RedisServer(tmp_path)
    store = OutageStore(RedisStore(srv.url, "t:", timeout_s=0.3), retry_after_s=0.3)
    try:
        d = CounterDemand("c", 1.0, None, 0.2, 0, 3600.0)
        assert await store.reserve([d], "a", NOW + 600, NOW) == -1
        srv.pause()
        await store.settle([d], "a", 0.15, 5, NOW)  # sent, timed out: journaled
        assert not store.up and len(store.journal) == 1
        await store.add_usage("t", GROUP, 0.15, 3, 2, "a")  # journaled (Redis is down)
        srv.resume()
        await _until(lambda: store.up and not store.journal)
        remote = store.remote
        assert isinstance(remote, RedisStore)
        # a repeat of either (another replay, a second delivery) changes nothing
        await remote.settle([d], "a", 0.15, 5, NOW)
        await remote.add_usage("t", GROUP, 0.15, 3, 2, "a")
        st = await store.counter("c", NOW)
        assert (st.spent_usd, st.spent_tokens, st.reserved_usd) == (0.15, 5, 0.0)
        rows = await store.usage("t")
        assert [(r.group, r.usd, r.prompt_tokens, r.requests) for r in rows] == [
            (GROUP, 0.15, 3, 1)
        ]
        await remote.add_usage("t", GROUP, 0.15, 3, 2, "b")  # another settle id: counted
        assert [r.requests for r in await store.usage("t")] == [2]
        ttl = await remote.r.pttl("t:a:u:a")
        # remembered longer than the journal lives: admission.settle_id_ttl_s (1 h)
        assert 3_500_000 < ttl <= 3_600_000
    finally:
        await store.close()
        srv.stop()


def _rows(path: Path) -> int:
    with sqlite3.connect(path) as c:
        return int(c.execute("SELECT count(*) FROM journal").fetchone()[0])


async def test_the_journal_outlives_the_process_and_replays_once(tmp_path: Path) -> None:
    """Issue 12 item 2, in one process: settles journaled while Redis is down are committed
    to the journal file before they return; a store that dies without replaying them (its
    successor opens the same file) starts degraded with Redis still down, replays them once
    Redis is back, and a replay of the same entries again (a process killed between applying
    and deleting them) counts nothing twice."""
    srv = RedisServer(tmp_path, persist=True)
    path = tmp_path / "journal.sqlite"
    d = CounterDemand("c", 1.0, None, 0.2, 0, 3600.0)

    def store() -> OutageStore:
        return OutageStore(RedisStore(srv.url, "t:", timeout_s=0.3), retry_after_s=0.3,
                           journal=OutageJournal(path))

    first, second, third = store(), store(), store()
    try:
        assert await first.ping()
        assert await first.reserve([d], "a", NOW + 600, NOW) == -1
        srv.stop()
        await first.settle([d], "a", 0.15, 5, NOW)
        await first.add_usage("t", GROUP, 0.15, 3, 2, "a")
        await first.add_usage("t", GROUP, 0.05, 1, 1)  # no settle id: the journal gives one
        assert _rows(path) == 3  # committed when the calls returned
        entries = await OutageJournal(path).load()
        assert first._reconciler is not None
        first._reconciler.cancel()  # the process dies: nothing more of it runs
        assert await second.ping()  # Redis still down: starts degraded from its journal
        assert not second.up and len(second.journal) == 3
        srv.start()
        await _until(lambda: second.up and not second.journal)
        assert _rows(path) == 0
        st = await second.counter("c", NOW)
        assert (st.spent_usd, st.spent_tokens, st.reserved_usd) == (0.15, 5, 0.0)
        assert sum(r.requests for r in await second.usage("t")) == 2
        # the same entries replayed again (killed between applying and deleting them)
        journal = OutageJournal(path)
        for _, kind, payload in entries:
            await journal.append(kind, payload)
        await journal.close()
        assert await third.ping()
        await _until(lambda: not third.journal)
        st = await third.counter("c", NOW)
        assert (st.spent_usd, st.spent_tokens) == (0.15, 5)
        rows = await third.usage("t")
        assert sum(r.requests for r in rows) == 2
        assert sum(r.usd for r in rows) == pytest.approx(0.20)
    finally:
        for s in (second, third):
            await s.close()
        srv.stop()


async def test_redis_down_at_start_without_a_journal_is_a_start_up_error(tmp_path: Path) -> None:
    store = OutageStore(RedisStore(f"redis://127.0.0.1:{free_port()}/0", "t:", timeout_s=0.3),
                        journal=OutageJournal(tmp_path / "j.sqlite"))
    try:
        with pytest.raises(RedisConnectionError):
            await store.ping()
    finally:
        await store.close()


KEYS = {"budget": "sk-budget", "plain": "sk-plain"}
ACTUAL = 0.012  # 7 prompt + 5 completion tokens at 1000 $/Mtok


def _config(gw_port: int, up_port: int, redis_url: str, **gateway: Any) -> str:
    """``gateway``: more fields of the gateway block."""
    return to_yaml(pool_fleet(
        up_port,
        gateway={"port": gw_port, "scrape_interval_s": 0.05, "seed": 3, **gateway},
        admission={"store": "redis", "redis_url": redis_url, "redis_prefix": "o:",
                   "redis_timeout_s": 0.3, "outage_retry_after_s": 0.5},
        **PRICED_UPSTREAM,
        # no batch lane: `serve --workers` (tests/test_workers.py, bench/workers.py) refuses one
        # whose store is in memory
        batch={"enabled": False},
        tenants=[tenant("budget", KEYS["budget"],
                        budgets=[{"scope": "tenant", "window": "day", "usd": 1.0}]),
                 tenant("plain", KEYS["plain"])],
    ))


@pytest.fixture
def slow_upstream(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    p = Proc(["-m", "tests.support.fake_upstream", "--port", str(port), "--mode", "slow"],
             tmp_path / "up.log")
    try:
        p.wait_http(f"http://127.0.0.1:{port}/health")
        yield port
    finally:
        p.stop()


def test_gateway_through_a_redis_outage(tmp_path: Path, slow_upstream: int) -> None:
    srv = RedisServer(tmp_path)
    port = free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(_config(port, slow_upstream, srv.url))
    gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg)], tmp_path / "gw.log")
    base = f"http://127.0.0.1:{port}"
    chat = {"model": "m", "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 10}

    async def run() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=20) as c:
            def post(tenant: str, stream: bool = False, i: int = 0) -> object:
                return c.post("/v1/chat/completions", json={**chat, "stream": stream, "n": 1},
                              headers={"Authorization": f"Bearer {KEYS[tenant]}",
                                       "Idempotency-Key": f"{tenant}-{stream}-{i}"})

            assert (await post("budget", i=-1)).status_code == 200  # type: ignore[attr-defined]
            # two budget streams (1 s each) are in flight when Redis stops answering
            streams = [asyncio.ensure_future(post("budget", True, i)) for i in range(2)]
            await asyncio.sleep(0.3)
            srv.pause()
            during = await asyncio.gather(
                *(post(t, i=i) for i in range(4) for t in ("plain", "budget"))
            )
            for r in during:
                assert r.status_code in (200, 503), r.text  # type: ignore[attr-defined]
                body = r.json()  # type: ignore[attr-defined]
                if r.status_code == 503:  # type: ignore[attr-defined]
                    assert body["error"]["code"] == "store_unavailable"
                    assert set(body["error"]) == {"message", "type", "param", "code"}
                    assert r.headers["Retry-After"] == "1"  # type: ignore[attr-defined]
            plain = [r.status_code for r in during[0::2]]  # type: ignore[attr-defined]
            budget = [r.status_code for r in during[1::2]]  # type: ignore[attr-defined]
            assert plain == [200] * 4 and budget == [503] * 4
            for s in await asyncio.gather(*streams):
                assert s.status_code == 200 and b"[DONE]" in s.content  # type: ignore[attr-defined]
            usage = await c.get("/v1/usage", headers={"Authorization": f"Bearer {KEYS['plain']}"})
            assert usage.status_code == 503 and usage.json()["error"]["code"] == "store_unavailable"
            srv.resume()
            deadline = time.monotonic() + 10
            while True:  # budgets are back once the journal is replayed
                r = await post("budget", i=99)
                if r.status_code == 200:  # type: ignore[attr-defined]
                    break
                assert r.status_code == 503 and time.monotonic() < deadline  # type: ignore[attr-defined]
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.3)  # the last settle runs after its answer
            u = await c.get("/v1/usage", headers={"Authorization": f"Bearer {KEYS['budget']}"})
            assert u.status_code == 200
            # 1 before, 2 streams settled during the outage, 1 after: nothing lost
            assert u.json()["total"]["requests"] == 4
            assert u.json()["total"]["cost_usd"] == pytest.approx(4 * ACTUAL)
            p = await c.get("/v1/usage", headers={"Authorization": f"Bearer {KEYS['plain']}"})
            assert p.json()["total"]["requests"] == 4

    try:
        gw.wait_http(f"{base}/ready")
        asyncio.run(run())
        r = srv.client()
        keys = list(r.scan_iter(match="o:c:budget:budget:*"))
        assert len(keys) == 1
        su, ru = r.hmget(keys[0], ["su", "ru"])
        assert int(su) / 1e9 == pytest.approx(4 * ACTUAL) and int(ru or 0) == 0
    finally:
        gw.stop()
        srv.stop()
    log = gw.log.read_text()
    assert "Traceback" not in log and "internal error" not in log
    assert "admission store (Redis) unreachable" in log and "reachable again" in log


def test_spend_journaled_in_an_outage_survives_kill_9(tmp_path: Path, slow_upstream: int) -> None:
    """Issue 12 item 2, end to end: Redis stops while two budgeted streams are in flight; their
    settles, and the usage of an unbudgeted tenant's requests, are journaled. The gateway is
    killed with -9 and restarted while Redis is still down (it starts from its journal), then
    Redis comes back: the spend is reconciled exactly once."""
    srv = RedisServer(tmp_path, persist=True)
    port = free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(_config(port, slow_upstream, srv.url,
                           ledger_path=str(tmp_path / "ledger.sqlite")))
    journal = tmp_path / "ledger.sqlite.admission-journal.sqlite"
    base = f"http://127.0.0.1:{port}"
    chat = {"model": "m", "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 10}

    def post(c: httpx.AsyncClient, tenant: str, stream: bool = False) -> object:
        return c.post("/v1/chat/completions", json={**chat, "stream": stream},
                      headers={"Authorization": f"Bearer {KEYS[tenant]}"})

    async def before_the_kill() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=20) as c:
            assert (await post(c, "budget")).status_code == 200  # type: ignore[attr-defined]
            streams = [asyncio.ensure_future(post(c, "budget", True)) for _ in range(2)]
            await asyncio.sleep(0.3)
            srv.stop()
            for s in await asyncio.gather(*streams):
                assert s.status_code == 200 and b"[DONE]" in s.content  # type: ignore[attr-defined]
            for _ in range(3):
                assert (await post(c, "plain")).status_code == 200  # type: ignore[attr-defined]

    async def after_the_restart() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=20) as c:
            r = await post(c, "budget")  # Redis still down: budgets fail closed
            assert r.status_code == 503  # type: ignore[attr-defined]
            srv.start()
            deadline = time.monotonic() + 15
            while _rows(journal) > 0:
                assert time.monotonic() < deadline, "journal not replayed"
                await asyncio.sleep(0.1)
            hb = {"Authorization": f"Bearer {KEYS['budget']}"}
            while (u := await c.get("/v1/usage", headers=hb)).status_code != 200:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            assert u.json()["total"]["requests"] == 3  # 1 before, 2 settled in the outage
            assert u.json()["total"]["cost_usd"] == pytest.approx(3 * ACTUAL)
            p = await c.get("/v1/usage", headers={"Authorization": f"Bearer {KEYS['plain']}"})
            assert p.json()["total"]["requests"] == 3

    gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg)], tmp_path / "gw.log")
    gw2 = None
    try:
        gw.wait_http(f"{base}/ready")
        asyncio.run(before_the_kill())
        assert _rows(journal) == 7  # 2 budget settles + 5 usage updates (2 budget, 3 plain)
        gw.p.send_signal(signal.SIGKILL)
        gw.p.wait(5)
        gw2 = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg)], tmp_path / "gw2.log")
        gw2.wait_http(f"{base}/ready")
        asyncio.run(after_the_restart())
        r = srv.client()
        (key,) = list(r.scan_iter(match="o:c:budget:budget:*"))
        su, ru = r.hmget(key, ["su", "ru"])
        assert int(su) / 1e9 == pytest.approx(3 * ACTUAL) and int(ru or 0) == 0
    finally:
        gw.stop()
        if gw2 is not None:
            gw2.stop()
        srv.stop()
    log = gw2.log.read_text()
    assert "Traceback" not in log
    assert "starting degraded" in log and "reachable again" in log
