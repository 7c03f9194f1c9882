"""Client-retry recognition through the gateway (review29-fix29a #3): the gateway runs in this
process, in front of an in-process upstream, over real HTTP on loopback, with its pool held
"degraded" so that any request recognised as a retry is shed. A repeat of a request that was
answered 200 (Regenerate) is not a retry; a repeat of one that failed is."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from tests.support.fake_upstream import chat_app
from tests.support.procs import free_port
from tests.test_admission_integration import CHAT, KEYS, config

FAIL = {"on": False}


async def _reply(_: str) -> str:
    if FAIL["on"]:
        raise RuntimeError("upstream failure (a 500)")
    return "hello"


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Gateway, str]]:
    FAIL["on"] = False
    up = free_port()
    upstream = web.AppRunner(chat_app(_reply))
    await upstream.setup()
    await web.TCPSite(upstream, "127.0.0.1", up).start()
    port = free_port()
    gw = Gateway(parse_config(config(port, up), "f.yaml"))
    gw.admission.degraded = lambda pool: "saturated"  # type: ignore[method-assign]
    runner = await serve(gw, "127.0.0.1", port)
    try:
        yield gw, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await upstream.cleanup()


def _retries(gw: Gateway) -> float:
    return sum(s.value for m in gw.admission.metrics.client_retries.collect()
               for s in m.samples if s.name.endswith("_total"))


async def test_a_repeat_after_a_success_is_not_a_retry_a_repeat_after_a_failure_is(
    gateway: tuple[Gateway, str],
) -> None:
    gw, base = gateway
    body = {**CHAT, "max_tokens": 10}
    auth = {"Authorization": f"Bearer {KEYS['plain']}"}

    async def send(s: aiohttp.ClientSession) -> tuple[int, dict[str, Any]]:
        async with s.post(f"{base}/v1/chat/completions", json=body, headers=auth) as r:
            return r.status, await r.json()

    async with aiohttp.ClientSession() as s:
        for _ in range(3):  # the first, then Regenerate twice: each answered
            status, _answer = await send(s)
            assert status == 200
        assert _retries(gw) == 0
        FAIL["on"] = True
        status, _answer = await send(s)
        assert status >= 500
        FAIL["on"] = False
        status, answer = await send(s)  # the re-send after the failure: a retry, shed
        assert status == 429 and answer["error"]["code"] == "retry_shed"
        assert _retries(gw) == 1
