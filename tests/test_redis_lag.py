"""Redis calls and the gateway's own event-loop lag (`inferplane.looplag`).

On a loaded host the gateway's event loop runs late. A Redis call whose answer arrived in time
but was read only after the loop came back used to hit its 0.5 s client timeout: the admission
store then marked Redis down (budgets 503 for ``outage_retry_after_s``) and the shared slots fell
back to this process's view (the other replicas no longer saw its slots, and an engine ran past
its ``max_concurrency``). Now each call counts the process's running time, up to
``gateway.lag_max_stretch`` × its timeout of wall time.

The stall is real: a TCP proxy in the test's event loop forwards Redis's answers and, when armed,
blocks the whole loop (``time.sleep``) on the next one, as a descheduled gateway would. Each
test also runs the same stall without a `LoopLag` (the timeouts before) and shows it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from inferplane.admission.outage import OutageStore
from inferplane.admission.redis_state import RedisStore
from inferplane.admission.shared_placement import SharedPick, SharedPlacement
from inferplane.admission.slots import SharedSlots
from inferplane.admission.state import CounterDemand
from inferplane.errors import StoreUnavailableError
from inferplane.looplag import LoopLag
from tests.support.redis_server import RedisServer

NOW = 1_700_000_000.0
TIMEOUT_S = 0.2
STALL_S = 0.6  # longer than the timeout, well short of its cap (10 × 0.2 s: a loaded
STRETCH = 10.0  # machine may deschedule the test for a while on top of the stall)


class StallingProxy:
    """Forwards bytes between clients and Redis. `stall_next`: block the event loop for a
    while before forwarding Redis's next answer. ``hold``: never forward Redis's answers (a
    Redis that hangs)."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.stall_s = 0.0
        self.stalls = 0
        self.hold = False
        self.server: asyncio.Server | None = None
        self.port = 0
        self._tasks: set[asyncio.Future[object]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stall_next(self, seconds: float) -> None:
        self.stall_s = seconds

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.redis_port)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, answers: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await r.read(65536):
                    if answers and self.hold:
                        continue
                    if answers and self.stall_s:
                        seconds, self.stall_s = self.stall_s, 0.0
                        time.sleep(seconds)  # blocking on purpose: the whole loop stalls
                        self.stalls += 1
                    w.write(data)
                    await w.drain()
            w.close()

        task = asyncio.ensure_future(
            asyncio.gather(pump(cr, uw, False), pump(ur, cw, True), return_exceptions=True)
        )
        self._tasks.add(task)
        await task

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in self._tasks:
            t.cancel()


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[StallingProxy]:
    srv = RedisServer(tmp_path)
    p = StallingProxy(srv.port)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()
        srv.stop()


@pytest.fixture
async def lag() -> AsyncIterator[LoopLag]:
    lag = LoopLag(interval_s=0.02)
    lag.start()
    await asyncio.sleep(0.05)  # the ticker runs
    try:
        yield lag
    finally:
        await lag.stop()


def _store(url: str, lag: LoopLag | None) -> OutageStore:
    remote = RedisStore(url, "lag:", TIMEOUT_S, max_stretch=STRETCH if lag else 1.0)
    return OutageStore(remote, retry_after_s=30.0, lag=lag, max_stretch=STRETCH)


DEMAND = CounterDemand("c", 1.0, None, 0.01, 0, 3600.0)


async def test_a_budget_reserve_is_not_an_outage_when_the_gateway_stalled(
    proxy: StallingProxy, lag: LoopLag
) -> None:
    before, after = _store(proxy.url, None), _store(proxy.url, lag)
    try:
        for store in (before, after):
            assert await store.ping()
        # the timeouts before: Redis answered at once, the stalled loop read it late → 503
        proxy.stall_next(STALL_S)
        with pytest.raises(StoreUnavailableError):
            await before.reserve([DEMAND], "a", NOW + 600, NOW)
        assert proxy.stalls == 1 and not before.up
        # counting running time: the same stall, answered, and Redis stays in service
        proxy.stall_next(STALL_S)
        assert await after.reserve([DEMAND], "b", NOW + 600, NOW) == -1
        assert proxy.stalls == 2 and after.up and after.outages == 0
        await asyncio.sleep(0.1)  # the ticker's late tick has run
        assert lag.lost_s >= STALL_S / 2  # the stall was measured
    finally:
        await before.close()
        await after.close()


async def test_a_hung_redis_still_fails_by_the_cap(
    proxy: StallingProxy, lag: LoopLag, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However late the loop runs (all wall time counted as lag here), a Redis that does not
    answer is an outage by ``lag_max_stretch`` × the timeout: budgets fail closed with 503."""
    store = _store(proxy.url, lag)
    try:
        assert await store.ping()
        monkeypatch.setattr(lag, "lost_at", lambda now: now)
        proxy.hold = True
        async with asyncio.timeout(10):  # a hang fails the test instead of stalling the suite
            with pytest.raises(StoreUnavailableError):
                await store.reserve([DEMAND], "a", NOW + 600, NOW)
        assert not store.up
    finally:
        proxy.hold = False
        await store.close()


async def test_a_slot_is_taken_in_redis_when_the_gateway_stalled(
    proxy: StallingProxy, lag: LoopLag
) -> None:
    """A spurious slot outage is what let an engine run past ``max_concurrency`` under load
    (tests/test_replicas.py): the stalled replica took slots from its own view, which the
    other replicas could not see."""
    seen: dict[str, int] = {}

    def slots(lag: LoopLag | None) -> SharedSlots:
        return SharedSlots(proxy.url, "lag:", limits={"e": 2}, on_remote=seen.__setitem__,
                           lease_s=30.0, sync_s=30.0, timeout_s=TIMEOUT_S, retry_after_s=30.0,
                           lag=lag, max_stretch=STRETCH)

    before, after = slots(None), slots(lag)
    try:
        await before.start()
        await after.start()
        proxy.stall_next(STALL_S)
        assert await before.acquire("e") is not None  # from its own view: not in Redis
        assert before.down_since is not None
        proxy.stall_next(STALL_S)
        sid = await after.acquire("e")
        assert sid is not None and after.down_since is None
        assert proxy.stalls == 2
        # the slot taken during the stall is in Redis, where every replica counts it
        assert await after.r.zscore("lag:e:e", sid) is not None
    finally:
        await before.close()
        await after.close()


async def test_a_session_lookup_survives_the_gateways_stall(
    proxy: StallingProxy, lag: LoopLag
) -> None:
    def shared(lag: LoopLag | None) -> SharedPlacement:
        def learn(p: SharedPick) -> None:
            pass

        return SharedPlacement(proxy.url, "lag:", on_pick=learn, timeout_s=TIMEOUT_S,
                               retry_after_s=30.0, lag=lag, max_stretch=STRETCH)

    before, after = shared(None), shared(lag)
    try:
        await before.start()
        await after.start()
        async with asyncio.timeout(10):  # both subscribers are in: no answer left to stall
            while (await after.r.pubsub_numsub("lag:picks"))[0][1] < 2:
                await asyncio.sleep(0.01)
        await after.r.set("lag:s:k", "e1")
        proxy.stall_next(STALL_S)
        assert await before.session("k") is None and before.down_since is not None
        proxy.stall_next(STALL_S)
        assert await after.session("k") == "e1" and after.down_since is None
    finally:
        await before.close()
        await after.close()
