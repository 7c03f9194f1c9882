"""Redis at a gateway's start and across its restarts (audit27 F4-F6): a replica that starts
while Redis is down starts degraded (as a running one serves an outage) unless
``admission.start_without_redis`` is off, and a Redis that does not answer is then a one-line
start-up error naming ``admission.redis_url`` (exit status 2); a Redis that came back empty is
noticed (its epoch key), an evicting ``maxmemory-policy`` is warned about, settle ids expire
after ``admission.settle_id_ttl_s`` and client-chosen workflow ids cannot grow a tenant's usage
without bound. Each test starts its own redis-server on a free port."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError

from inferplane.admission.journal import OutageJournal
from inferplane.admission.outage import OutageStore
from inferplane.admission.redis_state import RedisStore
from inferplane.errors import StoreUnavailableError
from tests.builders import pool_fleet, tenant, to_yaml
from tests.support.procs import Proc, free_port
from tests.support.redis_server import RedisServer
from tests.test_admission_integration import PRICED_UPSTREAM
from tests.test_redis_outage import KEYS, slow_upstream  # noqa: F401 - a fixture

GROUP = ("2023-11-14", "", "m", "interactive", "k")


def _config(gw_port: int, up_port: int, redis_url: str, **admission: Any) -> str:
    return to_yaml(pool_fleet(
        up_port,
        gateway={"port": gw_port, "scrape_interval_s": 0.05, "seed": 3,
                 "metrics": {"public": True}},
        admission={"store": "redis", "redis_url": redis_url, "redis_prefix": "o:",
                   "redis_timeout_s": 0.3, "outage_retry_after_s": 0.5, **admission},
        **PRICED_UPSTREAM,
        batch={"enabled": False},
        tenants=[tenant("budget", KEYS["budget"],
                        budgets=[{"scope": "tenant", "window": "day", "usd": 1.0}]),
                 tenant("plain", KEYS["plain"])],
    ))


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 10}


def _post(c: httpx.Client, who: str) -> httpx.Response:
    return c.post("/v1/chat/completions", json=CHAT,
                  headers={"Authorization": f"Bearer {KEYS[who]}"})


def _until_budget_served(c: httpx.Client, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (r := _post(c, "budget")).status_code != 200:
        assert r.status_code == 503 and time.monotonic() < deadline, r.text
        time.sleep(0.2)


def test_a_replica_started_while_redis_is_down_starts_degraded_and_notices_lost_data(
    tmp_path: Path, slow_upstream: int  # noqa: F811
) -> None:
    """F6a: Redis stopped (connections refused), a gateway starts: unbudgeted requests are
    served, budgeted ones get 503 with Retry-After, and once Redis starts budgets are back. F5:
    Redis restarted without persistence (empty): the gateway logs that it lost its data and
    counts it in inferplane_admission_store_resets_total."""
    srv = RedisServer(tmp_path)
    srv.stop()
    port = free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(_config(port, slow_upstream, srv.url))
    gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg)], tmp_path / "gw.log")
    base = f"http://127.0.0.1:{port}"
    try:
        gw.wait_http(f"{base}/ready")
        with httpx.Client(base_url=base, timeout=20) as c:
            assert _post(c, "plain").status_code == 200
            r = _post(c, "budget")
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
            assert r.headers["Retry-After"] == "1"
            srv.start()
            _until_budget_served(c)
            assert "lost its data" not in gw.log.read_text()  # the first epoch it sees
            srv.stop()
            srv.start()  # no persistence: an empty Redis
            _until_budget_served(c)
            deadline = time.monotonic() + 10
            while "inferplane_admission_store_resets_total 1.0" not in (
                    m := c.get("/metrics").text):
                assert time.monotonic() < deadline, m[-2000:]
                time.sleep(0.2)
    finally:
        gw.stop()
        srv.stop()
    log = gw.log.read_text()
    assert "Traceback" not in log
    assert "unreachable at start-up" in log and "starting degraded" in log
    assert "reachable again" in log
    assert log.count("admission store (Redis) lost its data") == 1


def _serve_exit(cfg: Path, command: str = "serve") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferplane.cli", command, "-c", str(cfg),
         "--port", str(free_port()), "--log-level", "error"],
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize("command", ["serve", "epp"])
def test_a_redis_that_does_not_answer_at_start_is_a_one_line_error(
    tmp_path: Path, command: str
) -> None:
    """F6b: with start_without_redis off, a Redis that accepts connections but does not answer
    (paused) is `cannot reach the admission store (admission.redis_url …)`, exit status 2 (it
    was a bare `cannot start the gateway: TimeoutError`, exit status 1), for the gateway and
    the picker alike (the picker's was an empty `error:` line: its TimeoutError is an OSError)."""
    srv = RedisServer(tmp_path)
    srv.pause()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(_config(free_port(), free_port(), srv.url, start_without_redis=False))
    try:
        proc = _serve_exit(cfg, command)
    finally:
        srv.stop()
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert lines == [f"error: cannot reach the admission store (admission.redis_url "
                     f"{srv.url!r} in {cfg}): no answer within admission.redis_timeout_s "
                     f"(0.3 s)"], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_password_in_the_redis_url_is_not_shown(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.yaml"
    url = f"redis://:sekrit@127.0.0.1:{free_port()}/0"
    cfg.write_text(_config(free_port(), free_port(), url, start_without_redis=False))
    proc = _serve_exit(cfg)
    assert proc.returncode == 2, proc.stderr
    assert "sekrit" not in proc.stderr and ":***@127.0.0.1" in proc.stderr


async def _raised(url: str) -> BaseException:
    store = RedisStore(url, "t:", timeout_s=0.3)
    try:
        await store.ping()
    except Exception as exc:
        return exc
    finally:
        await store.close()
    raise AssertionError("ping answered")


async def test_which_start_up_failures_are_an_outage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused connections and timeouts are an outage; an unknown host or refused credentials
    are a configuration error (the store raises them even with start_degraded). The resolver's
    answers are given (`socket.getaddrinfo`, which the event loop's resolver calls): a name
    that does not exist (EAI_NONAME) is a configuration error, a temporary failure (EAI_AGAIN,
    what a machine without a reachable resolver answers for every name) an outage. Those two
    given answers are the test of the rule; the real resolver's answer for a ``.invalid`` name
    (which of the two depends on the machine) only shows that the cause reaches `transient` as
    a ``socket.gaierror`` through redis-py's connect (its check restates the rule)."""
    from inferplane.admission.outage import transient

    refused = await _raised(f"redis://127.0.0.1:{free_port()}/0")
    assert isinstance(refused, RedisConnectionError) and transient(refused)
    assert transient(TimeoutError())
    real = await _raised("redis://no-such-host.invalid:6379/0")
    cause = real.__cause__ or real.__context__
    assert isinstance(cause, socket.gaierror), repr(real)
    assert transient(real) == (cause.errno == socket.EAI_AGAIN), repr(cause)
    resolve = socket.getaddrinfo
    for errno, outage in ((socket.EAI_NONAME, False), (socket.EAI_AGAIN, True)):
        def answer(host: Any, *args: Any, errno: int = errno, **kwargs: Any) -> Any:
            if host in ("no-such-host.invalid", "dns-blip.invalid"):
                raise socket.gaierror(errno, "given by the test")
            return resolve(host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", answer)
        host = "dns-blip.invalid" if outage else "no-such-host.invalid"
        given = await _raised(f"redis://{host}:6379/0")
        assert isinstance(given, RedisConnectionError), repr(given)
        assert (given.__cause__ or given.__context__).errno == errno  # type: ignore[union-attr]
        assert transient(given) is outage
    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    srv = RedisServer(tmp_path, args=["--requirepass", "right"])
    try:
        wrong = await _raised(f"redis://:wrong@127.0.0.1:{srv.port}/0")
        assert isinstance(wrong, AuthenticationError) and not transient(wrong)
        store = OutageStore(RedisStore(f"redis://:wrong@127.0.0.1:{srv.port}/0", "t:",
                                       timeout_s=0.3),
                            journal=OutageJournal(None), start_degraded=True)
        with pytest.raises(AuthenticationError):
            await store.ping()
        await store.close()
    finally:
        srv.stop()
    store = OutageStore(RedisStore(f"redis://127.0.0.1:{free_port()}/0", "t:", timeout_s=0.3),
                        journal=OutageJournal(None), start_degraded=True)
    try:
        assert await store.ping() and not store.up
    finally:
        await store.close()


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru", "noeviction"])
async def test_an_evicting_redis_is_warned_about_at_start(
    tmp_path: Path, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    srv = RedisServer(tmp_path, args=["--maxmemory", "100mb", "--maxmemory-policy", policy])
    store = OutageStore(RedisStore(srv.url, "t:", timeout_s=0.5), journal=OutageJournal(None))
    try:
        with caplog.at_level(logging.WARNING, "inferplane.admission"):
            assert await store.ping()
    finally:
        await store.close()
        srv.stop()
    warned = [r.getMessage() for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    if policy == "noeviction":
        assert warned == []
    else:
        assert len(warned) == 1 and policy in warned[0] and "104857600" in warned[0]


@pytest.mark.parametrize("age_s", [7200.0, 600.0])
async def test_replaying_a_journal_older_than_the_settle_ids_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, age_s: float,
) -> None:
    """edge28 item 3: a process killed during an outage leaves its journal; one started later
    replays it. Redis remembers a settle's id ``admission.settle_id_ttl_s``: a journal older
    than that can count an update twice, and the replay says so in one WARNING with the age
    (a younger one says nothing of it). Each entry carries when it was journaled (``at``)."""
    path = tmp_path / "journal.sqlite"
    t0 = 1_800_000_000.0
    down = OutageStore(RedisStore(f"redis://127.0.0.1:{free_port()}/0", "t:", timeout_s=0.3),
                       journal=OutageJournal(path), start_degraded=True, wall=lambda: t0)
    assert await down.ping()  # Redis down: degraded
    await down.add_usage("acme", GROUP, 0.5, 1, 2, settle_id="u1")
    await down.close()  # the entry stays in the file
    srv = RedisServer(tmp_path)
    later = OutageStore(RedisStore(srv.url, "t:", timeout_s=0.5, settle_id_ttl_s=3600.0),
                        journal=OutageJournal(path), wall=lambda: t0 + age_s)
    try:
        with caplog.at_level(logging.WARNING, "inferplane.admission"):
            assert await later.ping()
            deadline = time.monotonic() + 10
            while later.journal:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        assert [r.requests for r in await later.usage("acme")] == [1]
    finally:
        await later.close()
        srv.stop()
    old = [r.getMessage() for r in caplog.records if "settle_id_ttl_s" in r.getMessage()]
    if age_s > 3600:
        assert old == [
            "replaying admission updates journaled 2.0 h ago, longer than "
            "admission.settle_id_ttl_s (3600 s): Redis no longer remembers the ids of updates "
            "that reached it before, so any of these that had (a timed-out update that still "
            "ran, a process killed between applying and deleting one) counts twice in budgets "
            "and usage"], old
    else:
        assert old == []


async def test_an_outage_longer_than_the_settle_ids_warns_at_its_replay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """review28 S3: within one process, an update journaled during an outage that lasts
    longer than ``admission.settle_id_ttl_s`` is replayed after Redis forgot the ids: one
    WARNING at that replay (a later short outage says nothing of it)."""
    srv = RedisServer(tmp_path, persist=True)  # a restart is the same Redis
    now = [1_800_000_000.0]
    store = OutageStore(RedisStore(srv.url, "t:", timeout_s=0.3, settle_id_ttl_s=3600.0),
                        journal=OutageJournal(tmp_path / "journal.sqlite"),
                        retry_after_s=0.05, wall=lambda: now[0])

    async def outage(hours: float, settle_id: str) -> None:
        srv.stop()
        await store.add_usage("acme", GROUP, 0.5, 1, 2, settle_id=settle_id)  # journaled
        assert store.journal
        now[0] += hours * 3600
        srv.start()
        deadline = time.monotonic() + 10
        while store.journal or not store.up:  # the reconciler replays it
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)

    try:
        assert await store.ping()
        with caplog.at_level(logging.WARNING, "inferplane.admission"):
            await outage(2.0, "u1")
            await outage(0.1, "u2")
        assert [r.requests for r in await store.usage("acme")] == [2]
    finally:
        await store.close()
        srv.stop()
    old = [r.getMessage() for r in caplog.records if "settle_id_ttl_s" in r.getMessage()]
    assert len(old) == 1 and "journaled 2.0 h ago" in old[0], old


async def test_a_redis_that_lost_its_data_is_noticed_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """F5 in the store: Redis restarted with persistence is the same Redis; without, an empty
    one: one ERROR and one reset counted, by each process that sees it."""
    for persist, resets in ((True, 0), (False, 1)):
        d = tmp_path / f"persist-{persist}"
        d.mkdir()
        srv = RedisServer(d, persist=persist)
        store = OutageStore(RedisStore(srv.url, "t:", timeout_s=0.3),
                            journal=OutageJournal(None), retry_after_s=0.1)
        try:
            assert await store.ping()
            first = store.epoch
            assert first is not None
            srv.stop()
            with pytest.raises(StoreUnavailableError):
                await store.usage("t")
            srv.start()
            deadline = time.monotonic() + 10
            while not store.up:  # the reconciler finds it back
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert store.resets == resets
            assert (store.epoch == first) == (resets == 0)
            assert srv.client().get("t:epoch") == store.epoch  # rewritten
        finally:
            await store.close()
            srv.stop()
    lost = [r for r in caplog.records if "lost its data" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelno == logging.ERROR


async def test_settle_ids_expire_after_the_setting_and_workflows_are_capped(
    tmp_path: Path,
) -> None:
    """F4: the dedupe keys live settle_id_ttl_s (not a day); a tenant's usage keeps at most
    max_workflows distinct workflow ids a day, the others count under '(other)'."""
    srv = RedisServer(tmp_path)
    store = RedisStore(srv.url, "t:", timeout_s=0.5, settle_id_ttl_s=60.0, max_workflows=2)
    r = srv.client()
    try:
        for i, wf in enumerate(["a", "b", "c", "d", "a", ""]):
            group = (GROUP[0], wf, *GROUP[2:])
            await store.add_usage("acme", group, 0.5, 1, 2, settle_id=f"id{i}")
        ttl = r.pttl("t:a:u:id0")
        assert 0 < ttl <= 60_000
        rows = {row.group[1]: row.requests for row in await store.usage("acme")}
        assert rows == {"a": 2, "b": 1, "(other)": 2, "": 1}
        assert r.smembers(f"t:w:acme:{GROUP[0]}") == {"a", "b"}
        assert 0 < r.pttl(f"t:w:acme:{GROUP[0]}") <= 2 * 86_400_000
        await store.add_usage("acme", (GROUP[0], "e", *GROUP[2:]), 0.5, 1, 2)  # no id
        rows = {row.group[1]: row.requests for row in await store.usage("acme")}
        assert rows["(other)"] == 3
    finally:
        await store.close()
        srv.stop()


# -- a Redis that answers but is misconfigured stops start-up, start_without_redis or not ------
ACL_USER = "inferplane"


def _acl(tmp: Path, rules: str) -> RedisServer:
    """A Redis whose user ``inferplane`` (password ``pw``) has these ACL rules besides
    ``on >pw ~* &*``."""
    return RedisServer(tmp, args=["--user", ACL_USER, "on", ">pw", "~*", "&*", *rules.split()])


async def test_an_acl_that_refuses_the_scripts_is_a_start_up_error(tmp_path: Path) -> None:
    """PING allowed is not enough: a user without @scripting (NOPERM on EVALSHA) is a
    configuration error even with start_degraded; it was taken for Redis answering (and every
    budget then 503 in an outage that never ends)."""
    from redis.exceptions import NoPermissionError

    from inferplane.admission.outage import transient

    srv = _acl(tmp_path, "+@all -@scripting")
    store = OutageStore(RedisStore(f"redis://{ACL_USER}:pw@127.0.0.1:{srv.port}/0", "t:",
                                   timeout_s=0.5),
                        journal=OutageJournal(None), start_degraded=True)
    try:
        with pytest.raises(NoPermissionError) as raised:
            await store.ping()
        assert not transient(raised.value)
    finally:
        await store.close()
        srv.stop()


def test_an_acl_that_refuses_the_slots_stops_serve(tmp_path: Path) -> None:
    """Shared slots start as an outage only when Redis is down (refused, a timeout): an ACL
    that refuses their sorted-set commands (NOPERM in their script) is exit status 2 with
    start_without_redis on (it started, the slots in an outage that never ended)."""
    srv = _acl(tmp_path, "+@all -@sortedset")
    cfg = tmp_path / "gw.yaml"
    url = f"redis://{ACL_USER}:pw@127.0.0.1:{srv.port}/0"
    cfg.write_text(_config(free_port(), free_port(), url, start_without_redis=True,
                           shared_slots=True))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "inferplane.cli", "serve", "-c", str(cfg),
             "--port", str(free_port()), "--log-level", "error"],
            capture_output=True, text=True, timeout=30,
        )
    finally:
        srv.stop()
    assert proc.returncode == 2, proc.stderr
    assert "error: cannot reach the admission store (admission.redis_url" in proc.stderr
    assert "can't run this command" in proc.stderr and "pw@" not in proc.stderr


async def test_a_server_that_closes_the_connection_is_a_start_up_error(tmp_path: Path) -> None:
    """What ``redis://`` at a TLS-only Redis gets (the server closes the plaintext connection):
    not Redis being down, so a start-up error with start_degraded (it started degraded)."""
    from inferplane.admission.outage import transient

    async def close(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    server = await asyncio.start_server(close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = OutageStore(RedisStore(f"redis://127.0.0.1:{port}/0", "t:", timeout_s=0.5),
                        journal=OutageJournal(None), start_degraded=True)
    try:
        with pytest.raises(RedisConnectionError) as raised:
            await store.ping()
        assert not transient(raised.value)
    finally:
        await store.close()
        server.close()
        await server.wait_closed()


async def test_a_replica_started_without_redis_warns_of_eviction_once_it_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    srv = RedisServer(tmp_path, args=["--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru"])
    srv.stop()
    store = OutageStore(RedisStore(srv.url, "t:", timeout_s=0.5), journal=OutageJournal(None),
                        start_degraded=True, retry_after_s=0.1)
    try:
        with caplog.at_level(logging.WARNING, "inferplane.admission"):
            assert await store.ping() and not store.up
            srv.start()
            deadline = time.monotonic() + 10
            while not (store.up and store.epoch):  # the reconciler finds it
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
    finally:
        await store.close()
        srv.stop()
    warned = [r.getMessage() for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    assert len(warned) == 1 and "allkeys-lru" in warned[0], warned
