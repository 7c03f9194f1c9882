"""`gateway.send_bursts_together` (`dispatch.turns.TurnGate`): the requests of a burst are all
placed before any is sent upstream; a lone request is sent one turn of the loop later. Only
requests the HTTP gateway sends to a self-hosted engine are held, whatever their priority: not
those for provider APIs, the batch lane nor the simulator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from inferplane.dispatch.turns import TurnGate
from inferplane.fleet.model import Endpoint, Fleet
from inferplane.twin.simulator.simulator import simulate
from tests.builders import model, pool_fleet, to_yaml
from tests.support.batch_lane import Env as BatchEnv
from tests.support.batch_lane import Upstream as BatchUpstream
from tests.support.batch_lane import jsonl, line
from tests.support.batch_lane import start as start_batch
from tests.support.held_upstream import KEY, HeldUpstream, config
from tests.support.procs import free_port
from tests.support.sim_fleet import fleet as sim_fleet
from tests.support.sim_fleet import trace as sim_trace

# -- the gate alone -------------------------------------------------------------------------


async def test_callers_of_one_turn_pass_together_at_the_next() -> None:
    gate, log = TurnGate(), []

    async def one(i: int) -> None:
        log.append(f"placed {i}")
        await gate.wait()
        log.append(f"sent {i}")

    await asyncio.gather(*(one(i) for i in range(3)))
    assert log == ["placed 0", "placed 1", "placed 2", "sent 0", "sent 1", "sent 2"]
    assert (gate.groups, gate.held) == (1, 3)


async def test_a_caller_resumes_in_the_next_turn_behind_what_was_queued() -> None:
    gate, log = TurnGate(), []
    loop = asyncio.get_running_loop()
    turns = [0]

    def tick() -> None:  # one call per turn of the loop
        turns[0] += 1
        if turns[0] < 10:
            loop.call_soon(tick)

    async def one() -> None:
        loop.call_soon(log.append, "queued before")
        start = turns[0]
        await gate.wait()
        log.append("sent")
        assert turns[0] - start == 1  # one turn, not two

    loop.call_soon(tick)
    await asyncio.sleep(0)  # the ticker is running
    await one()
    assert log == ["queued before", "sent"]
    assert (gate.groups, gate.held) == (1, 1)


async def test_groups_of_successive_turns_are_counted_apart() -> None:
    gate = TurnGate()
    await asyncio.gather(gate.wait(), gate.wait())
    await asyncio.sleep(0)  # the gate's bookkeeping of that turn has run
    await gate.wait()
    assert (gate.groups, gate.held) == (2, 3)


async def test_a_cancelled_caller_does_not_hold_up_the_others() -> None:
    gate = TurnGate()
    first = asyncio.create_task(gate.wait())
    second = asyncio.create_task(gate.wait())
    await asyncio.sleep(0)  # both wait now
    first.cancel()
    await asyncio.wait_for(second, 5)  # a liveness bound
    assert first.cancelled() and second.done() and not second.cancelled()


def test_a_gate_left_by_a_closed_loop_still_works_on_the_next() -> None:
    gate = TurnGate()
    first = asyncio.new_event_loop()
    left: list[asyncio.Task[None]] = []

    async def start() -> None:
        left.append(first.create_task(gate.wait()))

    first.run_until_complete(start())  # the group's bookkeeping callback never runs
    first.close()
    asyncio.run(asyncio.wait_for(gate.wait(), 5))  # passes (a liveness bound)
    assert (gate.groups, gate.held) == (2, 2)  # and counts a new group


# -- on the request path --------------------------------------------------------------------


def _config(port: int, together: bool) -> str:
    return config(port, send_bursts_together=together)


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


async def _burst(up: HeldUpstream, together: bool, n: int, monkeypatch: pytest.MonkeyPatch,
                 *, fleet: str | None = None, priorities: list[str] | None = None
                 ) -> tuple[list[str], Gateway]:
    """Open ``n`` requests queued in one turn of the loop (to the fleet file ``fleet``, else
    `config`'s; request ``i`` with ``priorities[i]``, else its class's): the order in which they
    were placed (reserved on their endpoint) and handed to the upstream client."""
    gw = Gateway(parse_config(fleet if fleet is not None else _config(up.port, together)))
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
        if priorities is not None:
            profiles = [p.with_(priority=pr) for p, pr in zip(profiles, priorities, strict=True)]
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
    assert (gw.turn_gate.groups, gw.turn_gate.held) == (1, 4)


async def test_a_mixed_burst_is_held_whole_batch_priority_included(
    upstream: HeldUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch-priority request read with interactive ones is held with them: sent at once, it
    would start an engine step alone and the others would wait out its prefill."""
    log, gw = await _burst(upstream, True, 3, monkeypatch,
                           priorities=["standard", "batch", "standard"])
    assert log == ["placed"] * 3 + ["sent"] * 3
    assert gw.turn_gate.held == 3


async def test_requests_for_a_provider_api_are_not_held(
    upstream: HeldUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hosted API has no engine step for a burst to join: each request goes as it is placed."""
    fleet = to_yaml(pool_fleet(
        upstream.port, key=KEY, substrate={"kind": "provider-api", "hardware": "provider-api"},
        models=[model(max_context=4096)], endpoint_fields={"name": "up", "max_concurrency": 8},
        gateway={"scrape_interval_s": 0.05, "seed": 1, "send_bursts_together": True}))
    log, gw = await _burst(upstream, True, 3, monkeypatch, fleet=fleet)
    assert log == ["placed", "sent"] * 3
    assert gw.turn_gate.held == 0


def test_which_endpoints_join_steps() -> None:
    def ep(kind: str, engine: str) -> Endpoint:
        hardware = {"gpu": "h100"}.get(kind, kind)
        cfg = parse_config(to_yaml(pool_fleet(
            1, substrate={"kind": kind, "hardware": hardware},
            endpoint_fields={"name": "up", "engine": engine})))
        return Fleet.from_config(cfg).endpoints[0]

    assert ep("gpu", "vllm").joins_steps and ep("cpu", "sglang").joins_steps
    assert ep("gpu", "openai-compatible").joins_steps  # TGI, llama.cpp, ... batch too
    assert not ep("provider-api", "vllm").joins_steps


async def test_the_batch_lane_is_not_held() -> None:
    up = BatchUpstream()
    up_runner = web.AppRunner(up.app())
    await up_runner.setup()
    up.port = free_port()
    await web.TCPSite(up_runner, "127.0.0.1", up.port).start()
    # a class of standard priority, so that only the lane (not the priority) keeps it unheld
    gw, runner, base = await start_batch(up, {"send_bursts_together": True},
                                         batch={"workload_class": "interactive"})
    async with aiohttp.ClientSession() as http:
        env = BatchEnv(up, base, gw, runner, http)
        try:
            b = await env.create(jsonl(line("r1"), line("r2"), line("r3")))
            done = await env.wait(b["id"], "completed")
            assert done["request_counts"]["completed"] == 3
        finally:
            await env.runner.cleanup()
            await up_runner.cleanup()
    assert gw.turn_gate.held == 0


def test_the_simulator_is_not_held() -> None:
    """The simulator's virtual clock has no burst read in one poll to gather."""
    sim = simulate(sim_fleet(gateway={"send_bursts_together": True}), sim_trace(6, 0.0),
                   "least-request", seed=1)
    assert all(r.status == 200 for r in sim.records)
    assert sim.core.turn_gate.held == 0


async def test_without_it_each_request_is_sent_as_soon_as_it_is_placed(
    upstream: HeldUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, gw = await _burst(upstream, False, 4, monkeypatch)
    assert log == ["placed", "sent"] * 4
    assert (gw.turn_gate.groups, gw.turn_gate.held) == (0, 0)


async def test_a_request_cancelled_at_the_gate_is_released_and_recorded(
    upstream: HeldUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client goes away while its placed request waits at the gate: its reservation is
    released, nothing is sent upstream and the record says 499. (The gate is held shut here so
    that the cancellation lands at it, whatever the turns.)"""
    gw = Gateway(parse_config(_config(upstream.port, True)))
    runner = await serve(gw, "127.0.0.1", free_port())
    reached, shut = asyncio.Event(), asyncio.Event()
    sent: list[object] = []

    async def at_gate(gate: TurnGate) -> None:
        reached.set()
        await shut.wait()  # never set

    async def dispatch(*args: Any, **kw: Any) -> Any:
        sent.append(args)
        raise AssertionError("sent upstream")

    monkeypatch.setattr(TurnGate, "wait", at_gate)
    monkeypatch.setattr(gw.dispatcher, "open", dispatch)
    try:
        tenant = gw.authenticate(f"Bearer {KEY}")
        body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
        profile = gw.classify("chat", body, {}, tenant)
        task = asyncio.create_task(gw.open("chat", profile, orjson.dumps(body)))
        await asyncio.wait_for(reached.wait(), 10)  # placed and reserved, now at the gate
        assert gw.live.live["up"].inflight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sent == [] and upstream.arrived == []
        assert gw.live.live["up"].inflight == 0
        record = gw.ledger.get(profile.request_id)
        assert record is not None and record["outcome"]["status"] == 499, record
    finally:
        await runner.cleanup()
