"""Scrapes held while the gateway's requests on an engine await their first token
(``gateway.scrape_defer_prefill_s``: `inferplane.fleet.scraper.Scraper`'s deferral)."""

from __future__ import annotations

import asyncio

import pytest

from inferplane.config.schema import GatewaySpec
from inferplane.fleet.live import LiveFleet, Reservation
from inferplane.fleet.model import Endpoint
from inferplane.fleet.scraper import Scraper, StaticMetricsSource, defer_cap
from tests.builders import fleet

DEFER_S = 0.5  # the deferral's own sleep; the back-off's waits here are other lengths


def queue_page(running: int, waiting: int) -> str:
    return (f'vllm:num_requests_running{{engine="0",model_name="m"}} {running}.0\n'
            f'vllm:num_requests_waiting{{engine="0",model_name="m"}} {waiting}.0\n')


@pytest.fixture
def live() -> LiveFleet:
    return LiveFleet(fleet(), stale_after_s=2.0)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


class Pages(StaticMetricsSource):
    """Serves ``page`` and records, at each scrape, how many of the gateway's requests there
    awaited their first token; the ``stop_after``-th scrape never answers (the loop then sits
    in the fetch until cancelled)."""

    def __init__(self, live: LiveFleet, page: str, stop_after: int) -> None:
        super().__init__()
        self.live = live
        self.page = page
        self.stop_after = stop_after
        self.scrapes: list[int] = []

    async def metrics(self, endpoint: Endpoint) -> str | None:
        self.scrapes.append(self.live.live[endpoint.name].pending_prefill)
        if len(self.scrapes) >= self.stop_after:
            await asyncio.get_running_loop().create_future()
        return self.page


def run_loop(live: LiveFleet, source: Pages, monkeypatch: pytest.MonkeyPatch, *,
             defer_s: float | None, deferral_ends: bool
             ) -> tuple[Scraper, asyncio.Task[None]]:
    """The scrape loop of eu-0 on a clock the sleeps move: the back-off's sleeps end at once;
    the deferral's (``DEFER_S``) ends at once when ``deferral_ends``, else never by itself."""
    now = [0.0]
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds: float) -> None:
        if seconds == DEFER_S and not deferral_ends:
            await asyncio.get_running_loop().create_future()
        now[0] += seconds
        await real_sleep(0)

    monkeypatch.setattr("inferplane.fleet.scraper.asyncio.sleep", fake_sleep)
    scraper = Scraper(live, source, interval_s=0.1,
                      max_duty=None, quiet_interval_s=1.0, quiet_busy=True,
                      defer_prefill_s=defer_s, clock=lambda: now[0])
    task = asyncio.create_task(scraper._scrape_loop(live.fleet.by_name["eu-0"]))
    return scraper, task


async def stop(task: asyncio.Task[None], held: list[Reservation]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for r in held:
        r.release()


async def test_a_scrape_waits_for_the_gateways_first_token(
    live: LiveFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page showed only the gateway's request (own): the next scrape falls due while that
    request awaits its first token, waits, and is made as soon as the first token arrives;
    then, nothing awaiting a first token, scrapes follow the back-off alone."""
    held = [live.reserve("eu-0", 10)]
    source = Pages(live, queue_page(1, 0), stop_after=3)
    scraper, task = run_loop(live, source, monkeypatch, defer_s=DEFER_S, deferral_ends=False)
    try:
        await settle()
        assert source.scrapes == [1] and scraper.deferred == 1
        held[0].first_token()
        await settle()
        assert source.scrapes == [1, 0, 0]  # at once, then undelayed
        assert scraper.deferred == 1
        assert not live.live["eu-0"].prefill_waiters  # nothing left waiting
    finally:
        await stop(task, held)


async def test_without_the_setting_scrapes_do_not_wait(
    live: LiveFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = [live.reserve("eu-0", 10)]
    source = Pages(live, queue_page(1, 0), stop_after=3)
    scraper, task = run_loop(live, source, monkeypatch, defer_s=None, deferral_ends=False)
    try:
        await settle()
        assert source.scrapes == [1, 1, 1] and scraper.deferred == 0
    finally:
        await stop(task, held)


async def test_a_page_with_another_clients_requests_is_not_deferred(
    live: LiveFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three on the page, one of them the gateway's: the queue is not the gateway's own, so
    its scrapes keep the paced wait, prefill or not."""
    held = [live.reserve("eu-0", 10)]
    source = Pages(live, queue_page(3, 0), stop_after=3)
    scraper, task = run_loop(live, source, monkeypatch, defer_s=DEFER_S, deferral_ends=False)
    try:
        await settle()
        assert source.scrapes == [1, 1, 1] and scraper.deferred == 0
    finally:
        await stop(task, held)


async def test_the_deferral_ends_at_its_bound(
    live: LiveFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first token that does not come holds each scrape at most defer_prefill_s."""
    held = [live.reserve("eu-0", 10)]
    source = Pages(live, queue_page(1, 0), stop_after=3)
    scraper, task = run_loop(live, source, monkeypatch, defer_s=DEFER_S, deferral_ends=True)
    try:
        await settle()
        assert source.scrapes == [1, 1, 1]
        assert scraper.deferred == 2  # after the first page and after the second
        assert scraper.deferred_s == pytest.approx(2 * DEFER_S)
    finally:
        await stop(task, held)


async def test_prefill_drained_follows_the_pending_prefills(live: LiveFleet) -> None:
    """Done at once with nothing awaiting a first token; else when the last one's first token
    arrives or it is released, whichever comes first."""
    assert live.prefill_drained("eu-0").done()  # type: ignore[union-attr]
    assert live.prefill_drained("nowhere") is None
    a, b = live.reserve("eu-0", 10), live.reserve("eu-0", 10)
    fut = live.prefill_drained("eu-0")
    assert fut is not None and not fut.done()
    a.first_token()
    assert not fut.done()
    b.release()
    assert fut.done() and not live.live["eu-0"].prefill_waiters
    a.release()
    c = live.reserve("eu-0", 10)
    cancelled = live.prefill_drained("eu-0")
    assert cancelled is not None
    cancelled.cancel()  # a waiter that gave up is dropped (its callback: the next turn)
    await settle()
    assert not live.live["eu-0"].prefill_waiters
    c.release()


@pytest.mark.parametrize(
    ("defer", "stale", "eject", "cap"),
    [
        (0.5, 2.0, None, 0.5),
        (1.0, 2.0, None, 0.5),  # a quarter of stale_after_s
        (1.0, 2.0, 1.2, 0.3),  # a quarter of stale_eject_s
        (None, 2.0, 1.2, None),  # off stays off
    ],
)
def test_the_deferral_stays_under_the_staleness_horizons(
    defer: float | None, stale: float, eject: float | None, cap: float | None
) -> None:
    assert defer_cap(defer, stale, eject) == (None if cap is None else pytest.approx(cap))


def test_off_by_default() -> None:
    assert GatewaySpec().scrape_defer_prefill_s is None
