"""An error answer that has a decision record names it, and the record says what the client got
(audit26 S3, S4): a 502 after the only endpoint failed, a 502 from an answer that could not be
read, and a 503 when placement found nothing each carry ``x-inferplane-decision-id`` and
``x-inferplane-receipt``, and ``GET /v1/decisions/{id}`` returns that status, error and failed
endpoints. An in-process gateway in front of upstreams on loopback, over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from tests.builders import endpoint, pool_fleet, to_yaml
from tests.support import fake_upstream
from tests.support.procs import free_port

KEY = "sk-error-records"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}


async def _not_json(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b"<html>gateway timeout</html>", content_type="application/json")


def _upstream(mode: str) -> web.Application:
    """`tests.support.fake_upstream` in ``mode``; ``notjson``: a 200 whose body is not JSON."""
    if mode != "notjson":
        return fake_upstream.build("up", mode, 0.0)
    app = web.Application()
    app[fake_upstream.WAITING] = 0.0
    app.router.add_post("/v1/chat/completions", _not_json)
    app.router.add_get("/health", fake_upstream.health)
    app.router.add_get("/metrics", fake_upstream.metrics)
    return app


class _FullSlots:
    """Shared slots (`admission.slots`) in which every endpoint but ``free`` stays at its
    max_concurrency across the replicas."""

    def __init__(self, free: str) -> None:
        self.free = free

    async def start(self, degraded: bool = False) -> None:
        pass

    async def close(self) -> None:
        pass

    async def acquire(self, endpoint: str) -> str | None:
        return "slot" if endpoint == self.free else None

    def release(self, endpoint: str, sid: str) -> None:
        pass

    async def wait_free(self, timeout: float) -> None:
        await asyncio.sleep(timeout)


async def _stack(
    tmp_path: Path, modes: Mapping[str, str], slots: Any = None, **sections: Any
) -> tuple[str, list[web.AppRunner]]:
    """A gateway with a SQLite ledger in front of one endpoint per ``modes`` entry; its base
    URL and every runner to clean up (the gateway's first). ``slots``: the gateway's shared
    slots; ``sections``: more blocks of the fleet file."""
    runners: list[web.AppRunner] = []
    eps = []
    for name, mode in modes.items():
        port = free_port()
        r = web.AppRunner(_upstream(mode))
        await r.setup()
        await web.TCPSite(r, "127.0.0.1", port).start()
        runners.append(r)
        eps.append(endpoint(name, port))
    gw_port = free_port()
    cfg = parse_config(to_yaml(pool_fleet(
        gateway={"port": gw_port, "scrape_interval_s": 0.05, "default_profile": "round-robin",
                 "ledger_path": str(tmp_path / "ledger.sqlite")},
        health={"outlier": {"enabled": False, "consecutive_5xx": None}},
        substrate={"cost": {"hourly_usd": 3.0}},
        endpoints=eps,
        key=KEY,
        **sections,
    )))
    gw = Gateway(cfg)
    runner = await serve(gw, "127.0.0.1", gw_port)
    if slots is not None:
        gw.slots = slots
    base = f"http://127.0.0.1:{gw_port}"
    async with aiohttp.ClientSession() as s:  # every endpoint probed healthy first
        for _ in range(200):
            async with s.get(f"{base}/ready") as r:
                if (await r.json())["usable_endpoints"] == len(modes):
                    break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the gateway did not see {len(modes)} usable endpoints")
    return base, [runner, *runners]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {KEY}"}, timeout=aiohttp.ClientTimeout(total=20)
    ) as s:
        yield s


async def _error_and_record(
    session: aiohttp.ClientSession, base: str, status: int,
    headers: Mapping[str, str] | None = None,
) -> tuple[aiohttp.ClientResponse, dict[str, Any], dict[str, Any]]:
    async with session.post(f"{base}/v1/chat/completions", json=CHAT, headers=headers) as r:
        body = await r.json()
        assert r.status == status, body
    rid = r.headers.get("x-inferplane-decision-id")
    assert rid, dict(r.headers)  # the answer names its record
    assert r.headers.get("x-inferplane-receipt"), dict(r.headers)
    async with session.get(f"{base}/v1/decisions/{rid}") as got:
        assert got.status == 200, await got.text()  # committed before the answer left
        record = await got.json()
    return r, body["error"], record


async def test_a_502_after_the_only_endpoint_failed_names_its_record_which_says_502(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    base, runners = await _stack(tmp_path, {"bad": "fail500"})
    try:
        r, error, record = await _error_and_record(session, base, 502)
        assert "no other eligible endpoint to re-place on" in error["message"]
        out = record["outcome"]
        assert out["status"] == 502  # not the re-placement's 503
        assert out["error"] == error["message"]  # what the client was told
        assert out["failed_endpoints"] == ["bad"]
        assert out["attempts"] == 1
        async with session.get(f"{base}/v1/decisions") as listed:
            items = (await listed.json())["data"]
        mine = [i["receipt"] for i in items if i["record"]["decision_id"] == record["decision_id"]]
        assert len(mine) == 2  # the failed attempt's record, then the answer's
        assert mine[-1] == r.headers["x-inferplane-receipt"]
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_a_502_after_every_replacement_failed_records_the_clients_message(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Both endpoints fail: the last record says what the client got and names both."""
    base, runners = await _stack(tmp_path, {"bad-1": "fail500", "bad-2": "fail500"})
    try:
        _, error, record = await _error_and_record(session, base, 502)
        out = record["outcome"]
        assert out["status"] == 502 and out["error"] == error["message"]
        assert sorted(out["failed_endpoints"]) == ["bad-1", "bad-2"]
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_a_502_from_an_unreadable_answer_carries_the_decision_headers(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    base, runners = await _stack(tmp_path, {"html": "notjson"})
    try:
        r, error, record = await _error_and_record(session, base, 502)
        assert "not JSON" in error["message"]
        assert r.headers["x-inferplane-endpoint"] == "html"  # placed: the pick is named
        assert record["outcome"]["status"] == 502
        assert record["outcome"]["error"] == error["message"]
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_a_503_with_nothing_eligible_names_its_record(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The request may use jurisdiction ``us`` only; the one endpoint is in ``eu``."""
    base, runners = await _stack(tmp_path, {"eu-0": "ok"})
    try:
        _, error, record = await _error_and_record(
            session, base, 503, {"x-inferplane-jurisdictions": "us"})
        assert error["code"] == "no_eligible_endpoint" and "jurisdiction" in error["message"]
        assert record["outcome"]["status"] == 503
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_a_queue_timeout_after_a_failed_attempt_names_its_record_which_says_503(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Shared slots: ``bad`` takes the request and fails before its first byte; ``full`` stays
    at its max_concurrency until the queue deadline. The client gets 503 ``queue_timeout``; the
    id's last record says so, not the failed attempt's 502 (review26 should 2)."""
    base, runners = await _stack(
        tmp_path, {"bad": "fail500", "full": "ok"}, slots=_FullSlots("bad"),
        admission={"queue": {"default_deadline_ms": 200}},
    )
    try:
        _, error, record = await _error_and_record(session, base, 503)
        assert error["code"] == "queue_timeout"
        out = record["outcome"]
        assert out["status"] == 503, out  # not the failed attempt's 502
        assert out["error"] == error["message"]
        assert out["failed_endpoints"] == ["bad"]
    finally:
        for runner in runners:
            await runner.cleanup()
