"""Replicas sharing one Redis compare their fleet files (edge28 item 4): each process publishes
its running file's SHA-256 with a lifetime, reads the others', and exposes a disagreement
(``inferplane_config_replicas{sha256}``, ``inferplane_config_replicas_disagree``, one WARNING
when it starts and one when it ends). Each test starts its own redis-server on a free port."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError

from inferplane.admission.config_peers import ConfigPeers
from inferplane.telemetry.metrics import GatewayMetrics
from inferplane.waits import stop_task
from tests.support.procs import Proc, free_port
from tests.support.redis_server import RedisServer
from tests.test_redis_outage import slow_upstream  # noqa: F401 - a fixture
from tests.test_redis_start import _config

A, B = "a" * 64, "b" * 64


async def test_replicas_see_each_others_fleet_files_and_say_when_they_differ(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    srv = RedisServer(tmp_path)
    metrics = GatewayMetrics()
    one = ConfigPeers(srv.url, "t:", on_seen=metrics.config_peers_seen)
    two = ConfigPeers(srv.url, "t:")
    caplog.set_level(logging.WARNING, logger="inferplane.config")
    try:
        one.set_sha256(A)
        two.set_sha256(A)
        await two.publish()
        assert await one.publish() == {A: 2} and not one.disagree
        two.set_sha256(B)  # a reload that reached one replica
        await two.publish()  # it says so at once (its own line)
        (said,) = [r.getMessage() for r in caplog.records]
        assert f"{B[:12]}… ×1 (this one)" in said, said
        caplog.clear()
        assert await one.publish() == {A: 1, B: 1} and one.disagree
        page = generate_latest(metrics.registry).decode()
        assert f'inferplane_config_replicas{{sha256="{A}"}} 1.0' in page
        assert f'inferplane_config_replicas{{sha256="{B}"}} 1.0' in page
        assert "inferplane_config_replicas_disagree 1.0" in page
        await one.publish()  # still disagreeing: said once
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1, lines
        assert "the 2 processes sharing this Redis run 2 different fleet files" in lines[0]
        assert f"{A[:12]}… ×1 (this one)" in lines[0] and f"{B[:12]}… ×1" in lines[0]
        await two.close()  # a clean stop removes its entry at once
        assert await one.publish() == {A: 1} and not one.disagree
        page = generate_latest(metrics.registry).decode()
        assert B not in page and "inferplane_config_replicas_disagree 0.0" in page
        assert "run one fleet file again" in caplog.records[-1].getMessage()
    finally:
        await one.close()
        await two.close()
        srv.stop()


async def test_a_killed_replica_drops_out_when_its_entry_expires(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path)
    one = ConfigPeers(srv.url, "t:")  # its entry lives 45 s
    gone = ConfigPeers(srv.url, "t:", ttl_s=0.3)
    try:
        one.set_sha256(A)
        gone.set_sha256(B)
        await gone.publish()
        await gone.r.aclose()  # killed: never removes its entry
        assert await one.publish() == {A: 1, B: 1}
        deadline = time.monotonic() + 10
        while await one.publish() != {A: 1}:  # its lifetime passes in Redis time
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert 0 < srv.client().pttl("t:cfg") <= 45_000  # the hash expires with its last entry
    finally:
        await one.close()
        srv.stop()


def test_two_gateways_on_different_fleet_files_show_it(
    tmp_path: Path, slow_upstream: int,  # noqa: F811 - the fixture
) -> None:
    """Two `inferplane serve` processes on one Redis, the second started with a changed fleet
    file: its /metrics shows both files and the disagreement, and its log says so."""
    srv = RedisServer(tmp_path)
    procs = []
    try:
        ports = [free_port(), free_port()]
        for i, port in enumerate(ports):
            cfg = tmp_path / f"gw{i}.yaml"
            text = _config(port, slow_upstream, srv.url)
            cfg.write_text(text if i == 0 else text + "\n# the second replica's edit\n")
            gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg)],
                      tmp_path / f"gw{i}.log")
            procs.append(gw)
            gw.wait_http(f"http://127.0.0.1:{port}/ready")
        deadline = time.monotonic() + 15
        while True:
            page = httpx.get(f"http://127.0.0.1:{ports[1]}/metrics").text
            if "inferplane_config_replicas_disagree 1.0" in page:
                break
            assert time.monotonic() < deadline, page
            time.sleep(0.1)
        assert page.count("inferplane_config_replicas{") == 2
        log = procs[1].log.read_text()
        assert "the 2 processes sharing this Redis run 2 different fleet files" in log, log
    finally:
        for gw in procs:
            gw.stop()
        srv.stop()


async def test_a_reload_during_a_publish_is_published_at_once() -> None:
    """A reload whose new hash arrives while a publish (with the old one) waits on Redis is
    published right after it, not at the next ``interval_s`` tick (review28 S1)."""
    peers = ConfigPeers("redis://127.0.0.1:9", "t:", interval_s=3600)
    sent: list[str | None] = []
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    second = asyncio.Event()

    async def publish() -> dict[str, int]:
        sent.append(peers.sha256)
        if len(sent) == 1:
            await gate  # the first publish is waiting on Redis
        else:
            second.set()
        return {}

    peers.publish = publish  # type: ignore[method-assign]
    peers.set_sha256(A)
    peers.start()
    try:
        while not sent:
            await asyncio.sleep(0)
        peers.set_sha256(B)  # a reload meanwhile
        gate.set_result(None)
        await asyncio.wait_for(second.wait(), 30)  # an hour's tick without the fix
        assert sent == [A, B]
    finally:
        await peers.close()


async def test_a_redis_that_refuses_the_comparison_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis answering the script with an error (an ACL without HGETALL) is one WARNING, not
    DEBUG lines only, and ``inferplane_config_replicas_stale`` says the reading is old until a
    publish succeeds; a dropped connection (Redis restarting) stays at DEBUG (review28 S2)."""
    metrics = GatewayMetrics()
    peers = ConfigPeers("redis://127.0.0.1:9", "t:", on_seen=metrics.config_peers_seen,
                        on_stale=metrics.config_replicas_stale.set, interval_s=0)
    answers: list[BaseException | list[bytes]] = [
        [b"me", A.encode()],
        NoPermissionError("this user has no permissions to run the 'hgetall' command"),
        NoPermissionError("this user has no permissions to run the 'hgetall' command"),
        RedisConnectionError("Connection closed by server."),
    ]
    done = asyncio.Event()

    async def script(**kw: object) -> list[bytes]:
        if not answers:
            done.set()
            await asyncio.Event().wait()
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    peers._script = script  # type: ignore[assignment]
    caplog.set_level(logging.DEBUG, logger="inferplane.config")
    peers.set_sha256(A)
    peers.start()
    try:
        await asyncio.wait_for(done.wait(), 30)
        page = generate_latest(metrics.registry).decode()
        assert "inferplane_config_replicas_stale 1.0" in page
        assert f'inferplane_config_replicas{{sha256="{A}"}} 1.0' in page  # the last reading
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and "NoPermissionError" in warned[0], warned
        assert "inferplane_config_replicas_stale 1" in warned[0]
        debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
        assert any("ConnectionError" in m for m in debug), debug
        await stop_task(peers._task)
        peers._task = None
        answers.append([b"me", A.encode()])
        assert await peers.publish() == {A: 1}  # Redis answers again
        page = generate_latest(metrics.registry).decode()
        assert "inferplane_config_replicas_stale 0.0" in page
    finally:
        await peers.close()
