"""`gateway.send_bursts_together` (`dispatch.turns.TurnGate`): the requests of a burst are all
placed before any is sent upstream; a lone request is sent one turn of the loop later."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from inferplane.dispatch.turns import TurnGate
from tests.support.procs import free_port
from tests.test_dispatch_gate import KEY, HeldUpstream, config

# -- the gate alone -------------------------------------------------------------------------


async def test_callers_of_one_turn_pass_together_at_the_next() -> None:
    gate, log = TurnGate(), []

    async def one(i: int) -> None:
        log.append(f"placed {i}")
        await gate.wait()
        log.append(f"sent {i}")

    await asyncio.gather(*(one(i) for i in range(3)))
    assert log == ["placed 0", "placed 1", "placed 2", "sent 0", "sent 1", "sent 2"]
    assert (gate.opened, gate.held) == (1, 3)


async def test_a_lone_caller_waits_one_turn() -> None:
    gate, log = TurnGate(), []

    async def other() -> None:
        log.append("other")

    async def one() -> None:
        asyncio.get_running_loop().call_soon(log.append, "queued before")
        await gate.wait()
        log.append("sent")

    await asyncio.gather(one(), other())
    # everything queued before the gate was first waited on runs first
    assert log == ["other", "queued before", "sent"]
    assert (gate.opened, gate.held) == (1, 1)


async def test_a_cancelled_caller_does_not_hold_up_or_cancel_the_others() -> None:
    gate = TurnGate()
    first = asyncio.create_task(gate.wait())
    second = asyncio.create_task(gate.wait())
    await asyncio.sleep(0)  # both wait now
    first.cancel()
    await asyncio.wait_for(second, 5)  # a liveness bound
    assert first.cancelled() and second.done() and not second.cancelled()
    # the next turn's callers get a new opening
    await asyncio.wait_for(gate.wait(), 5)
    assert gate.opened == 2


# -- on the request path --------------------------------------------------------------------


def _config(port: int, together: bool) -> str:
    text = config(port)
    return text.replace("gateway: {", f"gateway: {{send_bursts_together: {str(together).lower()}, ")


@pytest.fixture
async def upstream() -> AsyncIterator[HeldUpstream]:
    up = HeldUpstream()
    up.hold.set()  # answers at once
    runner = web.AppRunner(up.app())
    await runner.setup()
    up.port = free_port()
    await web.TCPSite(runner, "127.0.0.1", up.port).start()
    try:
        yield up
    finally:
        await runner.cleanup()


async def _burst(up: HeldUpstream, together: bool, n: int,
                 monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], Gateway]:
    """Open ``n`` requests queued in one turn of the loop; the order in which they were placed
    (reserved on their endpoint) and handed to the upstream client."""
    gw = Gateway(parse_config(_config(up.port, together)))
    runner = await serve(gw, "127.0.0.1", free_port())
    log: list[str] = []
    hold, dispatch = gw.hold, gw.dispatcher.open

    async def placed(*args: Any, **kw: Any) -> Any:
        p = await hold(*args, **kw)
        log.append("placed")
        return p

    async def sent(*args: Any, **kw: Any) -> Any:
        log.append("sent")
        return await dispatch(*args, **kw)

    monkeypatch.setattr(gw, "hold", placed)
    monkeypatch.setattr(gw.dispatcher, "open", sent)
    try:
        tenant = gw.authenticate(f"Bearer {KEY}")
        bodies = [{"model": "m", "max_tokens": 5,
                   "messages": [{"role": "user", "content": f"prompt {i}"}]} for i in range(n)]
        profiles = [gw.classify("chat", b, {}, tenant) for b in bodies]
        attempts = await asyncio.gather(*(
            gw.open("chat", p, orjson.dumps(b)) for p, b in zip(profiles, bodies, strict=True)))
        for a in attempts:
            assert a.response.response.status == 200
            await a.response.response.read()
            a.reservation.release()
        assert len(up.arrived) == n
    finally:
        await runner.cleanup()
    return log, gw


async def test_a_burst_is_placed_whole_before_any_request_is_sent(
    upstream: HeldUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, gw = await _burst(upstream, True, 4, monkeypatch)
    assert log == ["placed"] * 4 + ["sent"] * 4
    assert (gw.turn_gate.opened, gw.turn_gate.held) == (1, 4)


async def test_without_it_each_request_is_sent_as_soon_as_it_is_placed(
    upstream: HeldUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, gw = await _burst(upstream, False, 4, monkeypatch)
    assert log == ["placed", "sent"] * 4
    assert gw.turn_gate.opened == 0
