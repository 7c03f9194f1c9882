"""Event-loop lag (`inferplane.looplag`): deadlines in the gateway's running time.

A stall is the event loop held by a blocking call (``time.sleep``), which is what a process
descheduled on a loaded host looks like from inside. The tests compare orders of events (a stall
longer than the deadline, an answer after it), never a measured duration against a threshold.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from inferplane.config.loader import parse_config
from inferplane.fleet.model import Fleet
from inferplane.fleet.scraper import HttpMetricsSource
from inferplane.looplag import LoopLag
from tests.builders import model, pool_fleet, to_yaml
from tests.support.procs import free_port


async def _stall_then_answer(stall_s: float) -> str:
    time.sleep(stall_s)  # the loop cannot run: the process is descheduled
    await asyncio.sleep(0.01)  # the answer arrives just after the stall
    return "answer"


async def test_a_stall_longer_than_the_deadline_is_not_counted() -> None:
    lag = LoopLag(interval_s=0.02)
    lag.start()
    try:
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):  # what a plain timeout does with the same stall
            async with asyncio.timeout(0.2):
                await _stall_then_answer(0.4)
        async with lag.deadline(0.2):
            assert await _stall_then_answer(0.4) == "answer"
        assert lag.lost_s >= 0.3  # the stalls were measured
    finally:
        await lag.stop()


async def test_the_deadline_still_fires_when_the_loop_runs() -> None:
    lag = LoopLag(interval_s=0.02)
    lag.start()
    try:
        never = asyncio.Event()
        with pytest.raises(TimeoutError):
            async with lag.deadline(0.1) as cm:
                await never.wait()
        assert cm.expired()
        with pytest.raises(TimeoutError):  # max_s bounds it whatever the lag
            async with lag.deadline(0.1, max_s=0.15):
                await _stall_then_answer(0.3)
    finally:
        await lag.stop()


async def test_the_deadline_passes_other_exceptions_and_cancellation_through() -> None:
    """An error of the block leaves as itself, an outer cancellation as a cancellation (not a
    timeout), and neither leaves a check armed."""
    lag = LoopLag(interval_s=0.02)
    lag.start()
    try:
        d = lag.deadline(5.0)
        with pytest.raises(ValueError, match="boom"):
            async with d as cm:
                raise ValueError("boom")
        assert not cm.expired() and d._handle is None

        entered = asyncio.Event()
        d = lag.deadline(5.0)

        async def blocked() -> None:
            async with d:
                entered.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(blocked())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert d._handle is None
    finally:
        await lag.stop()


async def test_without_a_ticker_it_is_a_plain_timeout() -> None:
    lag = LoopLag()
    with pytest.raises(TimeoutError):
        async with lag.deadline(0.1):
            await _stall_then_answer(0.2)
    assert lag.lost_s == 0.0


async def test_lost_time_counts_a_pending_late_tick() -> None:
    lag = LoopLag(interval_s=0.1)
    lag.tick(0.5, now=10.0)
    assert lag.lost_s == 0.5 and lag.recent_max_s(10.0) == 0.5
    lag.start()
    await asyncio.sleep(0)  # the ticker is running
    lag._due = 11.0  # a tick due at 11 has not run at 11.3: 0.3 s more are already lost
    assert lag.lost_at(11.3) == pytest.approx(0.8)
    assert lag.lost_at(10.9) == pytest.approx(0.5)
    lag._due = asyncio.get_running_loop().time() + 60.0  # not late: stop books nothing
    await lag.stop()
    assert lag.lost_s == 0.5
    lag._due = 11.0  # a stopped ticker counts no pending tick (a deadline must still fire)
    assert lag.lost_at(11.3) == pytest.approx(0.5)
    assert lag.recent_max_s(100.0) == 0.0  # older than the recent window


async def test_stopping_the_ticker_books_a_pending_late_tick() -> None:
    """The lateness `lost_at` counted of a tick that had not run yet stays in the total when
    the ticker stops before that tick runs: the total never goes down (it is exported as a
    counter, inferplane_event_loop_lag_seconds_total)."""
    lag = LoopLag(interval_s=0.05)
    lag.start()
    await asyncio.sleep(0)  # the ticker runs: a tick is due within one interval
    time.sleep(0.2)  # the loop stalls past it: the tick is due and has not run
    pending = lag.lost_now()
    assert pending > lag.lost_s == 0.0
    await lag.stop()  # cancels the ticker before the late tick runs
    assert lag.ticks == 0
    assert lag.lost_s >= pending
    assert lag.lost_now() >= pending  # a stopped ticker adds nothing more


async def test_a_health_probe_is_not_failed_by_the_gateways_own_stall() -> None:
    """The 1 s probe and scrape timeouts count running time too: an endpoint whose /health
    answers at once is not marked down because the gateway's loop was held past the timeout
    (here the stall is in the same loop, as a descheduled host would hold it)."""
    async def health(request: web.Request) -> web.Response:
        time.sleep(0.5)  # blocking on purpose: the whole loop stalls
        return web.Response(text="")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    cfg = parse_config(to_yaml(pool_fleet(
        port, substrate={"cost": {"hourly_usd": 1.0}}, models=[model(max_context=4096)])))
    (endpoint,) = Fleet.from_config(cfg).endpoints
    lag = LoopLag(interval_s=0.02)
    lag.start()
    try:
        async with aiohttp.ClientSession() as s:
            await asyncio.sleep(0.05)
            assert not await HttpMetricsSource(s, timeout_s=0.25).healthy(endpoint)
            assert await HttpMetricsSource(s, timeout_s=0.25, lag=lag).healthy(endpoint)
    finally:
        await lag.stop()
        await runner.cleanup()


async def test_a_probe_stretched_by_lag_still_fails_by_its_wall_time_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scrape and health-probe deadlines stretch by the gateway's loop lag only up to
    ``gateway.lag_max_stretch`` × their timeout, like the first-byte timeout. The lag is
    injected (every second of wall time counts as lost: a loop that never runs on time), so the
    running-time deadline alone never fires. The endpoint answers /health and /metrics only
    after 1.6 s, unless the prober gave up and went away first: with the cap (2 × 0.2 s) the
    probe fails and the scrape reads nothing; stretched without a cap (the code before: aiohttp's
    10 × backstop, 2 s) the late answer arrived first and the endpoint counted as healthy."""
    gave_up: list[str] = []

    async def late(request: web.Request) -> web.Response:
        try:
            await asyncio.sleep(1.6)
        except asyncio.CancelledError:  # the prober closed the connection
            gave_up.append(request.path)
            raise
        return web.Response(text="vllm:num_requests_running 0\n")

    app = web.Application()
    app.router.add_get("/health", late)
    app.router.add_get("/metrics", late)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    cfg = parse_config(to_yaml(pool_fleet(
        port, substrate={"cost": {"hourly_usd": 1.0}}, models=[model(max_context=4096)])))
    (endpoint,) = Fleet.from_config(cfg).endpoints
    lag = LoopLag(interval_s=0.02)
    lag.start()
    monkeypatch.setattr(lag, "lost_at", lambda now: now)  # all wall time is lag
    try:
        async with aiohttp.ClientSession() as s:
            src = HttpMetricsSource(s, timeout_s=0.2, lag=lag, max_stretch=2.0)
            mark = lag.mark()
            assert not await src.healthy(endpoint)
            assert await src.metrics(endpoint) is None
            assert lag.ran_s(mark) == 0.0  # no running time counted: the cap fired
            async with asyncio.timeout(5):  # the handlers see the prober gone
                while len(gave_up) < 2:
                    await asyncio.sleep(0.01)
            assert sorted(gave_up) == ["/health", "/metrics"]
    finally:
        await lag.stop()
        await runner.cleanup()
