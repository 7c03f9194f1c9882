"""`gateway.send_bursts_together` (`dispatch.turns.TurnGate`): the requests of a burst are all
placed before any is sent upstream, each engine's shared-prefix leaders and short prompts first;
a lone request is sent one turn of the loop later. Only requests the HTTP gateway sends to an
engine that batches are held: not provider APIs, the batch lane nor the simulator."""

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
from inferplane.dispatch.turns import Held, TurnGate, release_order
from inferplane.fleet.model import Endpoint, Fleet
from inferplane.twin.simulator.simulator import simulate
from tests.builders import model, pool_fleet, to_yaml
from tests.support.procs import free_port
from tests.test_batch_api import Env as BatchEnv
from tests.test_batch_api import Upstream as BatchUpstream
from tests.test_batch_api import jsonl, line
from tests.test_batch_api import start as start_batch
from tests.test_dispatch_gate import KEY, HeldUpstream, config
from tests.test_simulator_pipeline import fleet as sim_fleet
from tests.test_simulator_pipeline import trace as sim_trace

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


def _chain(*blocks: str) -> tuple[str, ...]:
    """A prompt's block hash chain (each names the prefix up to its block), 100 tokens a block."""
    return tuple("/".join(blocks[: i + 1]) for i in range(len(blocks)))


def _held(*spec: tuple[str, float, tuple[str, ...]]) -> list[Held]:
    """(endpoint, uncached tokens, block chain) in arrival order, standard priority, 100 tokens
    a block."""
    return [Held(ep, cost, 100 * len(hs), hs, 1, i) for i, (ep, cost, hs) in enumerate(spec)]


def _seqs(held: list[Held]) -> list[int]:
    return [h.seq for h in release_order(held)]


def test_release_order_is_least_uncached_first_ties_in_arrival() -> None:
    assert _seqs(_held(("a", 900, ()), ("a", 64, ()), ("b", 900, ()), ("a", 0, ()),
                       ("b", 64, ()))) == [3, 1, 4, 0, 2]


def test_a_prefix_leader_goes_before_the_requests_that_reuse_it() -> None:
    """Placement counts a shared head as uncached for the first request of the burst that
    carries it (the leader: it computes it) and as cached for the rest. The followers' small
    counts do not send them ahead of the leader, nor ahead of an unrelated prompt shorter than
    the leader's: the family's work counts at the leader."""
    shared = ("s", "p", "q", "r", "t")
    order = _seqs(_held(
        ("a", 600, _chain(*shared, "x")),        # 0: leader: the shared head is not cached
        ("a", 700, _chain("u", "v", "w", "y")),  # 1: unrelated, longer than the leader
        ("a", 100, _chain(*shared, "y")),        # 2: reuses 0's head
        ("a", 300, _chain("k", "l", "m")),       # 3: unrelated, shorter than the leader
        ("a", 650, _chain(*shared, "z", "z2", "z3", "z4", "z5", "z6", "z7")),  # 4: reuses 0's
        ("b", 100, _chain(*shared, "y")),        # 5: the same head on another engine: its own
    ))
    assert order == [5, 3, 0, 2, 4, 1]


def test_a_head_the_engine_holds_already_ties_nobody() -> None:
    """Every prompt starts with the same system prompt, cached on the engine before the burst
    (placement counted it cached for the first too): shortest first, as if unrelated."""
    order = _seqs(_held(
        ("a", 500, _chain("sys", "a1", "a2", "a3", "a4", "a5")),
        ("a", 100, _chain("sys", "b1")),
        ("a", 300, _chain("sys", "c1", "c2", "c3")),
    ))
    assert order == [1, 2, 0]


def test_a_family_goes_at_its_most_urgent_members_band() -> None:
    head = _chain("s", "p", "q", "r", "t", "x")
    held = [Held("a", 10, 100, (), 1, 0), Held("a", 500, 600, head, 1, 1),
            Held("a", 5, 600, (*head[:5], "s/p/q/r/t/y"), 0, 2), Held("a", 1, 100, (), 2, 3)]
    # the critical follower pulls its leader ahead of the standard short prompt; sheddable last
    assert [h.seq for h in release_order(held)] == [1, 2, 0, 3]


async def test_a_group_goes_out_in_release_order() -> None:
    gate, log = TurnGate(), list[int]()

    async def one(i: int, cost: float, hashes: tuple[str, ...] = ()) -> None:
        await gate.wait("a", cost, 100 * len(hashes), hashes)
        log.append(i)

    head = _chain("s", "p", "q", "r", "t")
    await asyncio.gather(one(0, 900), one(1, 64), one(2, 500, head),
                         one(3, 0), one(4, 5, (*head[:4], "s/p/q/r/u")))
    assert log == [3, 1, 2, 4, 0]
    assert (gate.groups, gate.held) == (1, 5)
    assert gate.reordered == 4  # 0, 1, 2 and 4 resumed before their turn and waited


async def test_a_caller_out_of_order_waits_one_turn_more() -> None:
    gate = TurnGate()
    loop = asyncio.get_running_loop()
    turns = [0]
    took: dict[str, int] = {}

    def tick() -> None:  # one call per turn of the loop
        turns[0] += 1
        if turns[0] < 10:
            loop.call_soon(tick)

    async def one(name: str, cost: float) -> None:
        start = turns[0]
        await gate.wait("a", cost)
        took[name] = turns[0] - start

    loop.call_soon(tick)
    await asyncio.sleep(0)  # the ticker is running
    await asyncio.gather(one("long", 900), one("short", 10))
    assert took == {"short": 1, "long": 2}


async def test_a_cancelled_caller_lets_the_next_in_order_go() -> None:
    """The first in release order is cancelled while the others wait for it: they go."""
    gate = TurnGate()
    long = asyncio.create_task(gate.wait("a", 900))
    short = asyncio.create_task(gate.wait("a", 10))
    await asyncio.sleep(0)  # both are at the gate, one group
    short.cancel()
    await asyncio.wait_for(long, 5)  # a liveness bound
    assert short.cancelled() and not long.cancelled()


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
    assert (gw.turn_gate.groups, gw.turn_gate.held) == (1, 4)


async def _sent_order(up: HeldUpstream, prompts: list[str], monkeypatch: pytest.MonkeyPatch,
                      priority: str | None = None) -> tuple[list[str], Gateway, list[int]]:
    """Open one request per prompt, queued in one turn of the loop (placed in the order given):
    the prompts in the order they were handed to the upstream client, and the uncached prompt
    tokens placement expected for each (in the order given)."""
    gw = Gateway(parse_config(_config(up.port, True)))
    runner = await serve(gw, "127.0.0.1", free_port())
    sent: list[str] = []
    dispatch = gw.dispatcher.open

    async def logged(endpoint: Any, path: str, body: bytes, **kw: Any) -> Any:
        sent.append(orjson.loads(body)["messages"][-1]["content"])
        return await dispatch(endpoint, path, body, **kw)

    monkeypatch.setattr(gw.dispatcher, "open", logged)
    try:
        tenant = gw.authenticate(f"Bearer {KEY}")
        bodies = [{"model": "m", "max_tokens": 5,
                   "messages": [{"role": "user", "content": p}]} for p in prompts]
        profiles = [gw.classify("chat", b, {}, tenant) for b in bodies]
        if priority is not None:
            profiles = [p.with_(priority=priority) for p in profiles]
        attempts = await asyncio.gather(*(
            gw.open("chat", p, orjson.dumps(b)) for p, b in zip(profiles, bodies, strict=True)))
        uncached = [a.reservation.prefill_tokens for a in attempts]
        for a in attempts:
            await a.response.response.read()
            a.reservation.release()
        assert sorted(up.arrived) == sorted(prompts)
    finally:
        await runner.cleanup()
    return sent, gw, uncached


async def test_a_burst_is_sent_least_uncached_first(
    upstream: HeldUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The burst's prompts (placed in the order given) are handed to the upstream client
    shortest first: the engine's first step is not taken by a long prefill placed ahead of
    short ones."""
    prompts = [" ".join([f"w{i}"] * n) for i, n in enumerate((400, 20, 900, 5, 20))]
    sent, gw, _ = await _sent_order(upstream, prompts, monkeypatch)
    assert sent == [prompts[i] for i in (3, 1, 4, 0, 2)]
    assert (gw.turn_gate.groups, gw.turn_gate.held) == (1, 5)


async def test_a_shared_prefix_is_sent_by_its_leader_first(
    upstream: HeldUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three prompts share a long prefix: placement counts it uncached for the first placed
    (the leader) and cached behind it for the other two. The leader goes before them (they
    reuse what it computes), the short unrelated prompt before all three, the long unrelated
    one after them."""
    shared = " ".join(f"s{k}" for k in range(600))
    prompts = [shared + " one", " ".join(["x"] * 1500), shared + " two", "short",
               shared + " three"]
    sent, _, uncached = await _sent_order(upstream, prompts, monkeypatch)
    # the followers were placed as reusing the leader's head (their uncached tokens the least
    # of all): sorted by that alone they would go first, before the leader that computes it
    assert max(uncached[2], uncached[4]) < min(uncached[i] for i in (0, 1, 3))
    assert sent == [prompts[i] for i in (3, 0, 2, 4, 1)]


async def test_batch_priority_requests_are_not_held(
    upstream: HeldUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = [" ".join([f"w{i}"] * n) for i, n in enumerate((400, 20, 5))]
    sent, gw, _ = await _sent_order(upstream, prompts, monkeypatch, priority="batch")
    assert sent == prompts  # in the order placed, none at the gate
    assert gw.turn_gate.held == 0


async def test_requests_for_a_provider_api_are_not_held(
    upstream: HeldUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hosted API has no engine step for a burst to join: its requests go as placed."""
    gw = Gateway(parse_config(to_yaml(pool_fleet(
        upstream.port, key=KEY, substrate={"kind": "provider-api", "hardware": "provider-api"},
        models=[model(max_context=4096)], endpoint_fields={"name": "up", "max_concurrency": 8},
        gateway={"scrape_interval_s": 0.05, "seed": 1, "send_bursts_together": True}))))
    assert not gw.fleet.endpoints[0].joins_steps
    runner = await serve(gw, "127.0.0.1", free_port())
    try:
        tenant = gw.authenticate(f"Bearer {KEY}")
        bodies = [{"model": "m", "max_tokens": 5,
                   "messages": [{"role": "user", "content": f"p {i}"}]} for i in range(3)]
        profiles = [gw.classify("chat", b, {}, tenant) for b in bodies]
        attempts = await asyncio.gather(*(
            gw.open("chat", p, orjson.dumps(b)) for p, b in zip(profiles, bodies, strict=True)))
        for a in attempts:
            await a.response.response.read()
            a.reservation.release()
    finally:
        await runner.cleanup()
    assert len(upstream.arrived) == 3
    assert gw.turn_gate.held == 0


def test_which_endpoints_join_steps() -> None:
    def ep(kind: str, engine: str) -> Endpoint:
        hardware = {"gpu": "h100"}.get(kind, kind)
        cfg = parse_config(to_yaml(pool_fleet(
            1, substrate={"kind": kind, "hardware": hardware},
            endpoint_fields={"name": "up", "engine": engine})))
        return Fleet.from_config(cfg).endpoints[0]

    assert ep("gpu", "vllm").joins_steps and ep("cpu", "sglang").joins_steps
    assert not ep("gpu", "openai-compatible").joins_steps
    assert not ep("provider-api", "vllm").joins_steps


async def test_the_batch_lane_is_not_held() -> None:
    up = BatchUpstream()
    up_runner = web.AppRunner(up.app())
    await up_runner.setup()
    up.port = free_port()
    await web.TCPSite(up_runner, "127.0.0.1", up.port).start()
    gw, runner, base = await start_batch(up, {"send_bursts_together": True})
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

    async def at_gate(gate: TurnGate, *args: Any) -> None:
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
