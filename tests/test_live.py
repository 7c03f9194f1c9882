"""Live fleet state (fleet/live.py) on an injected clock, and the scraper (fleet/scraper.py) fed
by the in-memory `StaticMetricsSource`."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from inferplane.fleet.engine_metrics import EngineMetrics, parse_vllm
from inferplane.fleet.live import (
    EndpointLive,
    LatencyWindow,
    LiveFleet,
    Reservation,
    nearest_rank,
)
from inferplane.fleet.model import Endpoint
from inferplane.fleet.scraper import Scraper, StaticMetricsSource, idle_wait_cap
from inferplane.fleet.state import EndpointState, FleetSnapshot
from tests.builders import SMALL_FLEET_YAML, fleet

VLLM = (Path(__file__).parent / "fixtures" / "metrics" / "vllm.txt").read_text()


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def live(clock: Clock) -> LiveFleet:
    return LiveFleet(fleet(), stale_after_s=2.0, clock=clock, refresh_s=0.05)


def endpoint(live: LiveFleet, name: str) -> Endpoint:
    return live.fleet.by_name[name]


# -- staleness ---------------------------------------------------------------------------------


def test_never_scraped_is_stale_without_engine_signals(live: LiveFleet) -> None:
    s = live.snapshot().by_name["eu-0"].state
    assert s.stale and s.metrics_at is None and s.metrics_age_at(0.0) is None
    assert s.running is None and s.waiting is None and s.kv_usage is None
    assert s.queue_depth == 0.0 and s.healthy and s.usable


@pytest.mark.parametrize(
    ("age", "stale"), [(0.0, False), (1.9, False), (2.0, False), (2.01, True), (60.0, True)]
)
def test_stale_after_limit(live: LiveFleet, clock: Clock, age: float, stale: bool) -> None:
    live.update_metrics("eu-0", EngineMetrics(running=2.0, waiting=5.0))
    clock.advance(age)
    s = live.state_of("eu-0", clock())
    assert s.stale is stale
    assert s.metrics_age_at(clock()) == pytest.approx(age)
    assert s.waiting == 5.0  # the value is kept; `stale` says not to trust it
    assert s.queue_depth == (0.0 if stale else 5.0)


def test_snapshot_turns_stale_as_time_passes(live: LiveFleet, clock: Clock) -> None:
    live.update_metrics("eu-0", EngineMetrics(waiting=1.0))
    assert not live.snapshot().by_name["eu-0"].state.stale
    clock.advance(2.5)  # nothing written, but the refresh period has passed
    assert live.snapshot().by_name["eu-0"].state.stale
    live.update_metrics("eu-0", EngineMetrics(waiting=1.0))  # a fresh scrape
    assert not live.snapshot().by_name["eu-0"].state.stale


# -- health ------------------------------------------------------------------------------------


async def test_health_flips_after_consecutive_failures_and_back_after_one_success(
    live: LiveFleet,
) -> None:
    source = StaticMetricsSource()
    scraper = Scraper(live, source, failures_to_down=3)
    ep = endpoint(live, "eu-1")
    verdicts: list[bool] = []
    failures = 0
    for ok in [False, False, True, False, False, False, False, True, True]:
        source.health["eu-1"] = ok
        failures = await scraper.probe_once(ep, failures)
        verdicts.append(live.snapshot().by_name["eu-1"].state.healthy)
    assert verdicts == [True, True, True, True, True, False, False, True, True]
    assert live.snapshot().by_name["eu-0"].state.healthy  # others untouched


async def test_one_failure_enough_when_configured(live: LiveFleet) -> None:
    source = StaticMetricsSource()
    source.health["us-0"] = False
    scraper = Scraper(live, source, failures_to_down=1)
    assert await scraper.probe_once(endpoint(live, "us-0"), 0) == 1
    assert not live.snapshot().by_name["us-0"].state.usable


def test_set_health_and_ejection(live: LiveFleet) -> None:
    live.set_health("eu-0", False)
    live.set_ejected("eu-1", True, "p99 TTFT 4x the fleet")
    by = live.snapshot().by_name
    assert not by["eu-0"].state.healthy
    assert by["eu-1"].state.ejected and by["eu-1"].state.ejected_reason == "p99 TTFT 4x the fleet"
    assert not by["eu-1"].state.usable
    live.set_ejected("eu-1", False)
    assert live.snapshot().by_name["eu-1"].state.usable


# -- reservations and in-flight ------------------------------------------------------------------


def test_reservation_released_exactly_once(live: LiveFleet) -> None:
    r = live.reserve("eu-0", 300)
    s = live.snapshot().by_name["eu-0"].state
    assert (s.inflight, s.inflight_tokens, s.requests_total) == (1, 300, 1)
    r.release()
    r.release()  # idempotent: a second release (e.g. `finally` after an error path) is a no-op
    s = live.snapshot().by_name["eu-0"].state
    assert (s.inflight, s.inflight_tokens, s.requests_total) == (0, 0, 1)
    assert r.released


def test_inflight_counters(live: LiveFleet) -> None:
    rs = [live.reserve("eu-0", 100), live.reserve("eu-0", 50), live.reserve("us-0", 10)]
    by = live.snapshot().by_name
    assert (by["eu-0"].state.inflight, by["eu-0"].state.inflight_tokens) == (2, 150)
    assert (by["us-0"].state.inflight, by["eu-1"].state.inflight) == (1, 0)
    rs[1].release()
    by = live.snapshot().by_name
    assert (by["eu-0"].state.inflight, by["eu-0"].state.inflight_tokens) == (1, 100)
    for r in rs:
        r.release()
    by = live.snapshot().by_name
    assert all(v.state.inflight == 0 and v.state.inflight_tokens == 0 for v in by.values())
    assert by["eu-0"].state.requests_total == 2 and by["us-0"].state.requests_total == 1


def test_the_prefill_queue_is_expected_done_at_the_latest_predicted_first_token(
    live: LiveFleet, clock: Clock
) -> None:
    """`EndpointState.prefill_done_at`: the latest first token predicted (at reservation) for
    the requests still pending prefill; None when none is pending or one has no prediction."""
    def done_at() -> float | None:
        return live.snapshot().by_name["eu-0"].state.prefill_done_at

    t0 = clock.t
    assert done_at() is None
    a = live.reserve("eu-0", 100, prefill_tokens=90, ttft_s=0.5)
    assert a.prefill_end == t0 + 0.5 and done_at() == t0 + 0.5
    clock.advance(0.2)
    b = live.reserve("eu-0", 100, prefill_tokens=90, ttft_s=0.4)  # behind a: ends at t0 + 0.6
    assert done_at() == t0 + 0.6
    a.first_token()
    assert done_at() == t0 + 0.6
    c = live.reserve("eu-0", 100, prefill_tokens=90)  # no prediction: the end is unknown
    assert c.prefill_end is None and done_at() is None
    c.release()
    assert done_at() == t0 + 0.6
    b.release()  # a release before the first token ends its prefill too
    st = live.snapshot().by_name["eu-0"].state
    assert st.prefill_done_at is None and (st.pending_prefill, st.pending_prefill_tokens) == (0, 0)
    a.release()
    late = live.reserve("eu-0", 100, prefill_tokens=90, ttft_s=-1.0)  # never before now
    assert late.prefill_end == clock.t


def test_pending_prefill_keeps_the_prompts_squared_lengths(live: LiveFleet) -> None:
    """`EndpointState.pending_prefill_sq`: the sum of the pending prompts' squared uncached
    lengths, taken at reserve and given back at the first token or release (once)."""
    def sq() -> int:
        return live.snapshot().by_name["eu-0"].state.pending_prefill_sq

    a = live.reserve("eu-0", 800, prefill_tokens=768)
    b = live.reserve("eu-0", 100, prefill_tokens=32)
    assert sq() == 768 * 768 + 32 * 32
    a.first_token()
    assert sq() == 32 * 32
    a.release()
    b.release()
    b.release()
    assert sq() == 0


def test_each_reservation_removes_its_own_predicted_end(live: LiveFleet, clock: Clock) -> None:
    """Two pending requests with the same predicted first token: each first token (or release,
    idempotent after it) removes that request's own entry, once."""
    rec = live.live["eu-0"]
    a = live.reserve("eu-0", 100, prefill_tokens=90, ttft_s=0.5)
    b = live.reserve("eu-0", 100, prefill_tokens=90, ttft_s=0.5)
    c = live.reserve("eu-0", 100, prefill_tokens=90, ttft_s=0.2)
    assert a.prefill_end == b.prefill_end and a.prefill_key != b.prefill_key
    assert len(rec.prefill_ends) == 3
    a.first_token()
    a.release()
    assert sorted(rec.prefill_ends) == sorted({b.prefill_key, c.prefill_key})
    assert live.snapshot().by_name["eu-0"].state.prefill_done_at == b.prefill_end
    b.release()
    assert list(rec.prefill_ends) == [c.prefill_key]
    assert live.snapshot().by_name["eu-0"].state.prefill_done_at == c.prefill_end
    c.release()
    assert not rec.prefill_ends


def test_release_in_finally_even_on_error(live: LiveFleet) -> None:
    with pytest.raises(RuntimeError):
        r = live.reserve("eu-1", 7)
        try:
            raise RuntimeError("upstream failed")
        finally:
            r.release()
    r.release()
    assert live.snapshot().by_name["eu-1"].state.inflight == 0


# -- latency windows -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("samples", "q", "expected"),
    [
        ([], 50, None),
        ([0.3], 50, 0.3),
        ([0.3], 99, 0.3),
        ([3.0, 1.0, 2.0], 0, 1.0),
        ([3.0, 1.0, 2.0], 50, 2.0),
        ([3.0, 1.0, 2.0], 100, 3.0),
        ([float(i) for i in range(1, 101)], 50, 51.0),  # nearest rank of 0.5 * 99 = 49.5 → 50
        ([float(i) for i in range(1, 101)], 99, 99.0),
        ([1.0] * 99 + [50.0], 99, 1.0),
        ([1.0] * 98 + [50.0, 60.0], 99, 50.0),
    ],
)
def test_latency_percentiles(samples: list[float], q: float, expected: float | None) -> None:
    w = LatencyWindow()
    for x in samples:
        w.add(x)
    assert w.percentile(q) == expected
    assert len(w) == len(samples)


def test_latency_window_keeps_the_last_samples_and_recomputes() -> None:
    w = LatencyWindow(size=3)
    for x in (10.0, 20.0, 30.0):
        w.add(x)
    assert w.percentile(0) == 10.0
    w.add(1.0)  # evicts 10.0; the sorted cache is dropped
    assert len(w) == 3
    assert (w.percentile(0), w.percentile(50), w.percentile(100)) == (1.0, 20.0, 30.0)


@pytest.mark.parametrize("size", [3, 16, 64, 1024])
@pytest.mark.parametrize("odd", [False, True])
def test_latency_window_updated_in_place_equals_a_fresh_sort(size: int, odd: bool) -> None:
    """The sorted copy brought up to date sample by sample gives exactly the percentiles of a
    fresh sort, bit for bit, over duplicates, a window that wraps, and (``odd``) zeros of either
    sign, negatives and NaNs, which make it sort afresh."""
    rng = random.Random(size * 2 + odd)
    pool = [rng.uniform(0.001, 0.2) for _ in range(40)]  # few distinct values: many duplicates
    oddities = [0.0, -0.0, -1.0, math.nan, math.inf]
    w = LatencyWindow(size)
    ref: deque[float] = deque(maxlen=size)
    for i in range(6 * size + 50):
        x = rng.choice(oddities) if odd and rng.random() < 0.05 else rng.choice(pool)
        if rng.random() < 0.5:
            x = rng.uniform(0.001, 0.2)
        w.add(x)
        ref.append(x)
        if rng.random() < 0.3 or i % 17 == 0:
            fresh = sorted(ref)
            for q in (0, 1, 50, 90, 99, 100):
                got, want = w.percentile(q), nearest_rank(fresh, q)
                assert repr(got) == repr(want), (i, q)
    assert w.values() == list(ref)


def test_observed_latencies_reach_the_state(live: LiveFleet) -> None:
    for ms in (100, 110, 120, 130, 900):
        live.observe_ttft("eu-0", ms / 1000)
    for ms in (10, 20, 30):
        live.observe_itl("eu-0", ms / 1000)
    s = live.state_of("eu-0", 0.0)
    assert (s.ttft_p50_s, s.ttft_p99_s) == (0.12, 0.9)
    assert (s.itl_p50_s, s.itl_p99_s) == (0.02, 0.03)
    t = live.state_of("eu-1", 0.0)
    assert t.ttft_p50_s is None and t.itl_p99_s is None


def test_a_streams_gaps_at_once_are_the_same_window_as_one_by_one(live: LiveFleet) -> None:
    gaps = [0.012, 0.011, 0.012, 0.5, 0.013]
    live.observe_itl("eu-0", 0.02)
    live.observe_itl("eu-1", 0.02)
    live.observe_itls("eu-0", gaps)
    for g in gaps:
        live.observe_itl("eu-1", g)
    assert live.live["eu-0"].itl.values() == live.live["eu-1"].itl.values() == [0.02, *gaps]


# -- error rate ----------------------------------------------------------------------------------


def test_error_rate(live: LiveFleet, clock: Clock) -> None:
    """Placement's error rate: failures ÷ attempts, each weighted by its age (half-life
    ``error_half_life_s``, 10 s), recomputed at most every ``refresh_s``."""
    now = clock.t
    assert live.state_of("eu-0", now).error_rate == 0.0
    for ok in (True, False, True, True):
        live.observe_outcome("eu-0", ok)
    assert live.state_of("eu-0", now).error_rate == 0.0  # not yet refreshed
    assert live.state_of("eu-0", now + 0.1).error_rate == pytest.approx(0.25)
    for _ in range(96):
        live.observe_outcome("eu-0", True)
    assert live.state_of("eu-0", now + 0.2).error_rate == pytest.approx(0.01)
    for _ in range(10):
        live.observe_outcome("eu-0", False)
    assert live.state_of("eu-0", now + 0.3).error_rate == pytest.approx(11 / 110)
    # the sweep's window holds the last 100 attempts, with their times
    assert len(live.live["eu-0"].outcomes) == 100


def test_an_error_rate_with_no_new_outcomes_decays(live: LiveFleet, clock: Clock) -> None:
    """Issue 12 item 3: an endpoint steered away by its own errors gets no new outcomes; its
    error rate must still fall (the window that moved only with traffic kept it at 1.0 for
    good, starving the endpoint while it was never ejected either)."""
    for _ in range(5):
        live.observe_outcome("eu-0", False)
    t0 = clock.t
    assert live.state_of("eu-0", t0 + 0.1).error_rate == pytest.approx(1.0)
    # while the evidence weighs more than one attempt it stays the share of failures ...
    assert live.state_of("eu-0", t0 + 20.0).error_rate == pytest.approx(1.0)  # 5 → 1.25
    # ... then falls by half every half-life
    assert live.state_of("eu-0", t0 + 40.0).error_rate == pytest.approx(5 / 16)
    assert live.state_of("eu-0", t0 + 100.0).error_rate < 0.01
    live.reset_observations("eu-0")
    assert live.state_of("eu-0", t0 + 101.0).error_rate == 0.0


# -- snapshots -----------------------------------------------------------------------------------


def test_snapshot_cached_while_nothing_changed(live: LiveFleet, clock: Clock) -> None:
    a = live.snapshot()
    clock.advance(0.01)
    assert live.snapshot() is a
    live.set_health("eu-0", True)  # no change: still cached
    live.set_ejected("eu-0", False)
    assert live.snapshot() is a


@pytest.mark.parametrize(
    "change",
    [
        lambda lv: lv.update_metrics("eu-0", EngineMetrics(running=1.0)),
        lambda lv: lv.set_health("eu-1", False),
        lambda lv: lv.set_ejected("us-0", True, "slow"),
        lambda lv: lv.reserve("eu-0", 1),
    ],
    ids=["metrics", "health", "ejected", "reserve"],
)
def test_snapshot_rebuilt_after_a_change(live: LiveFleet, clock: Clock, change: object) -> None:
    a = live.snapshot()
    change(live)  # type: ignore[operator]
    b = live.snapshot()
    assert b is not a and b.version > a.version
    assert live.snapshot() is b


def test_snapshot_rebuilt_after_release(live: LiveFleet) -> None:
    r = live.reserve("eu-0", 1)
    a = live.snapshot()
    r.release()
    b = live.snapshot()
    assert b is not a and b.by_name["eu-0"].state.inflight == 0
    r.release()
    assert live.snapshot() is b  # the second release changes nothing


def test_snapshot_refreshed_after_refresh_period(live: LiveFleet, clock: Clock) -> None:
    a = live.snapshot()
    clock.advance(0.06)
    b = live.snapshot()
    assert b is not a and b.version == a.version and b.now == pytest.approx(a.now + 0.06)


def test_observations_show_by_the_next_refresh(live: LiveFleet, clock: Clock) -> None:
    a = live.snapshot()
    live.observe_ttft("eu-0", 0.5)
    live.observe_outcome("eu-0", False)
    # Observations do not bump the version: the hot path keeps its cached snapshot ...
    assert live.snapshot() is a
    clock.advance(0.06)
    s = live.snapshot().by_name["eu-0"].state  # ... until the refresh period passes
    assert s.ttft_p50_s == 0.5 and s.error_rate == pytest.approx(0.5 ** (0.06 / 10))


def test_a_refresh_keeps_the_views_whose_state_cannot_have_moved(
    live: LiveFleet, clock: Clock
) -> None:
    """A full refresh re-evaluates every endpoint but keeps the view of one that nothing was
    written to and whose percentiles, error rate, staleness and rate-limit room come out the
    same (at 2,000 endpoints, rebuilding them all took ~13 ms every refresh): a scraped
    endpoint's view too, until its page turns stale, since the state holds the page's time."""
    a = live.snapshot()
    live.update_metrics("eu-1", EngineMetrics(running=1.0))  # a new page: rebuilt
    live.observe_outcome("us-0", False)  # its decayed error rate moves with the clock
    b = live.snapshot()
    assert b.by_name["eu-1"] is not a.by_name["eu-1"]
    clock.advance(0.06)
    c = live.snapshot()
    assert c is not b and c.now == clock.t
    assert c.by_name["eu-0"] is a.by_name["eu-0"]  # untouched: the same view
    assert c.by_name["eu-1"] is b.by_name["eu-1"]  # the same page, still fresh: kept
    assert c.by_name["eu-1"].state.metrics_age_at(c.now) == pytest.approx(0.06)
    assert c.by_name["eu-1"].state == live.state_of("eu-1", clock())
    assert c.by_name["us-0"] is not b.by_name["us-0"]  # the outcome shows by this refresh
    assert c.by_name["us-0"].state.error_rate > 0.0
    clock.advance(0.06)
    d = live.snapshot()
    assert d.by_name["eu-0"] is a.by_name["eu-0"]
    assert d.by_name["us-0"].state.error_rate < c.by_name["us-0"].state.error_rate  # decays
    clock.advance(live.stale_after_s - 0.2)  # the page 1.92 s old: not stale yet, kept
    assert live.snapshot().by_name["eu-1"] is b.by_name["eu-1"]
    clock.advance(0.1)
    e = live.snapshot()
    assert e.by_name["eu-1"] is not b.by_name["eu-1"] and e.by_name["eu-1"].state.stale
    assert e.by_name["eu-1"].state.metrics_age_at(e.now) == pytest.approx(2.02)


def test_an_old_failure_stops_moving_the_state_after_its_weight_falls_below_the_floor(
    live: LiveFleet, clock: Clock
) -> None:
    """One failure's decayed weight reaches `ERROR_FLOOR` after ~20 half-lives: from then on its
    error rate is 0 and a refresh keeps its view again (it decayed towards 0 for ~1,075
    half-lives, 3 hours at the default 10 s, and its view was rebuilt every refresh)."""
    floor = 1e-6  # fleet.live.ERROR_FLOOR
    live.observe_outcome("us-0", False)
    half_life = live.error_half_life_s
    clock.advance(half_life * (math.log2(1 / floor) - 0.5))
    a = live.snapshot()
    assert 0.0 < a.by_name["us-0"].state.error_rate < 2 * floor
    clock.advance(half_life)
    b = live.snapshot()
    assert b.by_name["us-0"].state.error_rate == 0.0
    assert live.live["us-0"].decayed_errors == 0.0
    clock.advance(0.06)
    assert live.snapshot().by_name["us-0"] is b.by_name["us-0"]


LIMITED_FLEET = SMALL_FLEET_YAML.replace(
    "      - name: us-0\n",
    "      - name: us-0\n        limits: {requests_per_min: 4, tokens_per_min: 120}\n",
)


@pytest.mark.parametrize("seed", range(8))
def test_refreshed_snapshots_equal_states_built_afresh(seed: int) -> None:
    """Through random writes, observations, scrapes and clock steps (through pages turning
    stale, and a declared rate limit's rolling minute), every full refresh's states equal what
    `state_of` gives at its time for every endpoint (what a refresh rebuilt before views were
    kept), and scraped and rate-limited endpoints keep their views where nothing moved."""
    rng = random.Random(seed)
    clock = Clock()
    live = LiveFleet(fleet(LIMITED_FLEET), stale_after_s=2.0, clock=clock, refresh_s=0.05)
    assert live.live["us-0"].rate is not None
    held: list[Reservation] = []
    names = [e.name for e in live.fleet.endpoints]
    kept = {"scraped": 0, "limited": 0}
    for _ in range(600):
        name, op = rng.choice(names), rng.randrange(8)
        if op == 0:
            held.append(live.reserve(name, rng.randint(1, 50)))
        elif op == 1 and held:
            held.pop(rng.randrange(len(held))).release()
        elif op == 2:
            live.observe_ttft(name, rng.choice([0.1, 0.3, 0.9]), rng.choice([None, 0.2]))
        elif op == 3 and rng.random() < 0.3:
            live.observe_outcome(name, rng.random() < 0.7)
        elif op == 4:
            live.update_metrics(name, EngineMetrics(running=1.0, waiting=2.0),
                                own=rng.random() < 0.5)
        elif op == 5 and rng.random() < 0.3:
            live.set_health(name, rng.random() < 0.8)
        clock.advance(rng.choice([0.0, 0.01, 0.03, 0.06, 0.2, 1.0, 2.5, 20.0]))
        before, at = live._snapshot, live._snapshot_at
        snap = live.snapshot()
        if snap is before or live._snapshot_at == at:
            # cached, or rebuilt only where written to (also at the clock of the last full
            # refresh, where main kept the untouched views too): not a full refresh
            continue
        fresh = LiveFleet.__new__(LiveFleet)
        fresh.__dict__.update(live.__dict__)
        for v in snap.endpoints:
            rec = live.live[v.name]
            saved = (rec.stats, rec.stats_at, rec.dirty)
            assert fresh.state_of(v.name, snap.now) == v.state, v.name
            rec.stats, rec.stats_at, rec.dirty = saved
            if before is not None and before.by_name.get(v.name) is v:
                kept["scraped"] += rec.metrics_at is not None
                kept["limited"] += rec.rate is not None
    assert kept["scraped"] > 0 and kept["limited"] > 0, kept


class _CountingDict(dict[str, EndpointLive]):
    """The live records, counting lookups by name."""

    lookups = 0

    def __getitem__(self, key: str) -> EndpointLive:
        self.lookups += 1
        return super().__getitem__(key)


@pytest.mark.parametrize("seed", range(5))
def test_snapshots_between_refreshes_rebuild_just_the_endpoints_written_to(seed: int) -> None:
    """Between full refreshes a new snapshot rebuilds the views of the endpoints written to
    since the last one (equal to `state_of` then) and keeps every other view (the same object),
    finding them without a lookup per endpoint (a request's reservation, first token and
    release each made a snapshot walk every view: 2,000 lookups a snapshot)."""
    rng = random.Random(seed)
    clock = Clock()
    live = LiveFleet(fleet(LIMITED_FLEET), stale_after_s=2.0, clock=clock, refresh_s=0.05)
    counting = _CountingDict(live.live)
    live.live = counting
    held: list[Reservation] = []
    names = [e.name for e in live.fleet.endpoints]
    prev = live.snapshot()
    partial = 0
    for _ in range(400):
        for _ in range(rng.randint(0, 2)):
            name, op = rng.choice(names), rng.randrange(5)
            if op == 0:
                held.append(live.reserve(name, rng.randint(1, 50), rng.randint(0, 9)))
            elif op == 1 and held:
                r = held.pop(rng.randrange(len(held)))
                r.first_token() if rng.random() < 0.5 else r.release()
            elif op == 2:
                live.update_metrics(name, EngineMetrics(running=1.0))
            elif op == 3:
                live.set_health(name, rng.random() < 0.8)
            else:
                live.set_ejected(name, rng.random() < 0.3, "x")
        clock.advance(rng.choice([0.0, 0.0, 0.01, 0.06]))
        dirty = {n for n in names if dict.__getitem__(counting, n).dirty}
        counting.lookups = 0
        snap = live.snapshot()
        if snap is prev or live._snapshot_at == clock.t:
            prev = snap
            continue  # cached, or a full refresh
        partial += 1
        assert counting.lookups <= 2 * len(dirty)
        for v, w in zip(snap.endpoints, prev.endpoints, strict=True):
            if v.name in dirty:
                assert v is not w
                rec = dict.__getitem__(counting, v.name)
                saved = (rec.stats, rec.stats_at, rec.dirty)
                assert live.state_of(v.name, snap.now) == v.state
                rec.stats, rec.stats_at, rec.dirty = saved
            else:
                assert v is w
        prev = snap
    assert partial > 50


@pytest.mark.parametrize("seed", range(4))
def test_the_snapshot_log_names_every_view_a_snapshot_replaced(seed: int) -> None:
    """`FleetSnapshot.log`: between any two of a live fleet's recent snapshots, every position
    whose view is not the same object is among the positions `changed_between` names (what
    admission's pool sums and reserved-capacity's in-flight sums correct, instead of comparing
    or summing every view), and from one snapshot to the next exactly those (a log naming more
    would cost the readers the walk it saves); unknown (None) across a reload or past the log's
    length."""
    rng = random.Random(seed)
    clock = Clock()
    live = LiveFleet(fleet(LIMITED_FLEET), stale_after_s=2.0, clock=clock, refresh_s=0.05)
    names = [e.name for e in live.fleet.endpoints]
    held: list[Reservation] = []
    kept: dict[int, FleetSnapshot] = {}
    known = reloaded_at = exact = 0
    prev: FleetSnapshot | None = None
    for step in range(500):
        name, op = rng.choice(names), rng.randrange(6)
        if op == 0:
            held.append(live.reserve(name, 10, rng.randint(0, 9)))
        elif op == 1 and held:
            held.pop(rng.randrange(len(held))).release()
        elif op == 2:
            live.update_metrics(name, EngineMetrics(running=1.0))
        elif op == 3:
            live.set_health(name, rng.random() < 0.8)
        elif op == 4 and step % 97 == 0:
            live.reconfigure(fleet(LIMITED_FLEET))
            names = [e.name for e in live.fleet.endpoints]
        clock.advance(rng.choice([0.0, 0.0, 0.01, 0.06, 3.0]))
        snap = live.snapshot()
        assert snap.log is not None
        kept[snap.serial] = snap
        if snap.log.changed_between(snap.serial - 1, snap.serial) is None:
            reloaded_at = snap.serial
        elif prev is not None and prev.serial == snap.serial - 1:
            assert snap.log.changed_between(prev.serial, snap.serial) == {
                i for i, (v, w) in enumerate(zip(snap.endpoints, prev.endpoints, strict=True))
                if v is not w
            }
            exact += 1
        prev = snap
        old = kept[rng.choice([k for k in kept if k >= snap.serial - 80])]
        changed = snap.log.changed_between(old.serial, snap.serial)
        if snap.serial - old.serial > 64 or old.serial < reloaded_at:
            assert changed is None
            continue
        assert changed is not None
        known += 1
        assert {
            i for i, (v, w) in enumerate(zip(snap.endpoints, old.endpoints, strict=True))
            if v is not w
        } <= changed
    assert known > 200 and exact > 100


def test_snapshot_contents(clock: Clock) -> None:
    index = object()
    live = LiveFleet(fleet(), clock=clock, prefix_index=index)  # type: ignore[arg-type]
    snap = live.snapshot()
    assert snap.now == clock.t and snap.version == 0
    assert snap.prefix_index is index and snap.fleet is live.fleet
    assert [v.name for v in snap.endpoints] == ["eu-0", "eu-1", "us-0"]
    assert [v.endpoint for v in snap.endpoints] == list(live.fleet.endpoints)


# -- scraper -------------------------------------------------------------------------------------


async def test_scraper_parses_the_vllm_fixture_into_the_snapshot(
    live: LiveFleet, clock: Clock
) -> None:
    source = StaticMetricsSource()
    source.texts["eu-0"] = VLLM
    scraper = Scraper(live, source)
    assert await scraper.scrape_once(endpoint(live, "eu-0")) is True
    s = live.snapshot().by_name["eu-0"].state
    assert not s.stale and s.metrics_age_at(clock()) == 0.0
    assert (s.running, s.waiting, s.queue_depth) == (25.0, 3.0, 3.0)
    assert s.kv_usage == pytest.approx((0.6125 + 0.4375) / 2)
    assert (s.block_size, s.num_gpu_blocks) == (16, 2 * 27_153)
    assert s.prefix_queries_total == 1_843_712 + 1_769_984
    assert s.prefix_hits_total == 1_021_440 + 987_136
    expected = parse_vllm(VLLM)
    assert (s.running, s.kv_usage) == (expected.running, expected.kv_usage)


async def test_scrape_failure_keeps_the_last_metrics_to_age(live: LiveFleet, clock: Clock) -> None:
    source = StaticMetricsSource()
    source.texts["eu-0"] = VLLM
    scraper = Scraper(live, source)
    ep = endpoint(live, "eu-0")
    await scraper.scrape_once(ep)
    source.texts["eu-0"] = None  # the endpoint stops answering /metrics
    clock.advance(1.0)
    assert await scraper.scrape_once(ep) is False
    s = live.snapshot().by_name["eu-0"].state
    assert not s.stale and s.metrics_age_at(clock()) == pytest.approx(1.0) and s.running == 25.0
    clock.advance(1.5)
    assert live.snapshot().by_name["eu-0"].state.stale


@pytest.mark.parametrize(
    ("duty", "took", "pause"),
    [
        (None, 0.3, 0.1),  # off: the fixed period whatever a scrape takes
        (0.05, 0.002, 0.1),  # a fast engine: still every interval_s
        (0.05, 0.005, 0.1),  # 0.005 x 19 = 0.095 < 0.1
        (0.05, 0.02, 0.38),  # a slow answer: 5 % of the engine's time at most
        (0.05, 0.1, 0.5),  # capped at max_interval_s
        (0.25, 0.1, 0.3),
    ],
)
def test_scrape_pause_keeps_the_engines_duty_under_the_limit(
    live: LiveFleet, duty: float | None, took: float, pause: float
) -> None:
    scraper = Scraper(live, StaticMetricsSource(), interval_s=0.1, max_duty=duty,
                      max_interval_s=0.5)
    assert scraper.pause_s(took) == pytest.approx(pause)
    if duty is not None and pause < 0.5:
        assert took / (took + scraper.pause_s(took)) <= duty + 1e-12


def test_scrape_pause_never_below_the_interval(live: LiveFleet) -> None:
    scraper = Scraper(live, StaticMetricsSource(), interval_s=1.0, max_duty=0.05,
                      max_interval_s=0.5)  # a cap under the interval: the interval wins
    assert scraper.pause_s(0.0) == 1.0 and scraper.pause_s(10.0) == 1.0


async def test_scrape_loop_waits_by_how_long_the_last_scrape_took(
    live: LiveFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop times each scrape on its clock and sleeps `pause_s` of it."""
    t = [0.0]
    takes = iter([0.001, 0.02, 0.2, 0.001])

    class Slow(StaticMetricsSource):
        async def metrics(self, endpoint: Endpoint) -> str | None:
            t[0] += next(takes)
            return VLLM

    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 4:
            raise asyncio.CancelledError

    scraper = Scraper(live, Slow(), interval_s=0.1, max_duty=0.05, max_interval_s=0.5,
                      clock=lambda: t[0])
    monkeypatch.setattr("inferplane.fleet.scraper.asyncio.sleep", fake_sleep)
    with pytest.raises(asyncio.CancelledError):
        await scraper._scrape_loop(endpoint(live, "eu-0"))
    assert slept == pytest.approx([0.1, 0.38, 0.5, 0.1])


def queue_page(running: int, waiting: int) -> str:
    """A vLLM page with only its queue: ``running`` and ``waiting`` requests."""
    return (f'vllm:num_requests_running{{engine="0",model_name="m"}} {running}.0\n'
            f'vllm:num_requests_waiting{{engine="0",model_name="m"}} {waiting}.0\n')


@pytest.mark.parametrize(
    ("paced", "quiet", "cap", "pause"),
    [
        (0.1, 0, 1.0, 0.1),  # the last page was not idle: the paced wait
        (0.1, 1, 1.0, 0.2),
        (0.1, 3, 1.0, 0.8),
        (0.1, 4, 1.0, 1.0),  # capped
        (0.1, 500, 1.0, 1.0),
        (0.1, 5, None, 0.1),  # off
        (0.5, 2, 0.4, 0.5),  # pacing already waits longer than the cap: pacing wins
    ],
)
def test_idle_back_off_doubles_the_wait_up_to_the_cap(
    live: LiveFleet, paced: float, quiet: int, cap: float | None, pause: float
) -> None:
    scraper = Scraper(live, StaticMetricsSource(), interval_s=0.1, quiet_interval_s=cap)
    assert scraper.quiet_pause_s(paced, quiet) == pytest.approx(pause)


def waits_by_scrape(pages: list[str], on_sleep: Callable[[int, int], None] | None = None,
                    now: list[float] | None = None, late_s: float = 0.0,
                    step_s: float | None = None,
                    ) -> tuple[type[StaticMetricsSource], Callable[[float], Awaitable[None]],
                               dict[int, list[float]]]:
    """A source serving ``pages`` in turn and a fake sleep that records each wait under the
    number of scrapes made so far and moves the clock ``now`` on by it (at most ``step_s``: a
    clock that says the sleep ended early) plus ``late_s`` (a loop waking late);
    ``on_sleep(scrapes, sleeps)`` runs after each; the loop is cancelled once every page was
    served."""
    now = now if now is not None else [0.0]
    served = [0]
    waits: dict[int, list[float]] = {}
    it = iter(pages)

    class Source(StaticMetricsSource):
        async def metrics(self, endpoint: Endpoint) -> str | None:
            served[0] += 1
            return next(it)

    async def fake_sleep(seconds: float) -> None:
        if served[0] == len(pages):
            raise asyncio.CancelledError
        waits.setdefault(served[0], []).append(seconds)
        now[0] += (seconds if step_s is None else min(seconds, step_s)) + late_s
        if on_sleep is not None:
            on_sleep(served[0], sum(len(v) for v in waits.values()))

    return Source, fake_sleep, waits


async def test_idle_engines_are_scraped_ever_more_rarely(
    live: LiveFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle engine (nothing on its page, nothing in flight from the gateway): each wait
    doubles up to quiet_interval_s, in one sleep (one wake-up per wait, not one per paced
    step)."""
    now = [0.0]
    Source, fake_sleep, waits = waits_by_scrape([queue_page(0, 0)] * 6, now=now)
    real_sleep = asyncio.sleep
    monkeypatch.setattr("inferplane.fleet.scraper.asyncio.sleep", fake_sleep)
    scraper = Scraper(live, Source(), interval_s=0.1, max_duty=None, quiet_interval_s=1.0,
                      clock=lambda: now[0])
    with pytest.raises(asyncio.CancelledError):
        await scraper._scrape_loop(endpoint(live, "eu-0"))
    assert waits == {1: pytest.approx([0.2]), 2: pytest.approx([0.4]), 3: pytest.approx([0.8]),
                     4: pytest.approx([1.0]), 5: pytest.approx([1.0])}
    await real_sleep(0)  # the waits' futures drop out of the record once cancelled
    assert not live.live["eu-0"].waiters


async def test_the_gateways_requests_put_an_idle_engine_back_on_the_paced_wait(
    live: LiveFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request the gateway sends to an idle engine ends the long wait (here with the fake
    sleep: `test_the_gateways_first_request_ends_the_idle_wait_at_once` times it); any request
    on the page, the gateway's own or anyone's, or a page without the gauges, keeps the paced
    wait."""
    held: list[Reservation] = []

    def on_sleep(scrapes: int, sleeps: int) -> None:
        if scrapes == 2 and not held:  # two requests sent during the second idle wait
            held.extend(live.reserve("eu-0", 10) for _ in range(2))
        elif scrapes == 4 and held:
            for r in held:
                r.release()
            held.clear()

    pages = [
        queue_page(0, 0),  # idle: 0.2
        queue_page(0, 0),  # idle: 0.4, the gateway's requests sent meanwhile
        queue_page(2, 0),  # the gateway's two requests: paced
        queue_page(1, 1),  # paced; then they end
        queue_page(0, 0),  # idle again: 0.2
        queue_page(0, 1),  # one waiting from elsewhere, none in flight here: paced
        "",  # no gauges: cannot tell, paced
        queue_page(0, 0),
    ]
    now = [0.0]
    Source, fake_sleep, waits = waits_by_scrape(pages, on_sleep, now=now)
    monkeypatch.setattr("inferplane.fleet.scraper.asyncio.sleep", fake_sleep)
    scraper = Scraper(live, Source(), interval_s=0.1, max_duty=None, quiet_interval_s=1.0,
                      clock=lambda: now[0])
    with pytest.raises(asyncio.CancelledError):
        await scraper._scrape_loop(endpoint(live, "eu-0"))
    assert waits == {1: pytest.approx([0.2]), 2: pytest.approx([0.4]),
                     3: pytest.approx([0.1]), 4: pytest.approx([0.1]),
                     5: pytest.approx([0.2]), 6: pytest.approx([0.1]),
                     7: pytest.approx([0.1])}


@pytest.mark.parametrize("quiet_busy", [False, True], ids=["idle-only", "quiet-busy"])
@pytest.mark.parametrize("sibling", [False, True], ids=["own", "sibling"])
async def test_the_gateways_first_request_ends_the_idle_wait_at_once(
    live: LiveFleet, monkeypatch: pytest.MonkeyPatch, quiet_busy: bool, sibling: bool
) -> None:
    """Without quiet_busy, the idle wait (one sleep) ends the moment the gateway reserves a
    request on the engine, or the shared slots report a sibling replica's there: the engine is
    scraped again at once, and the sleep is cancelled. With quiet_busy, neither ends it (its
    next page is expected to show just those requests). The sleep here never ends by itself."""
    real_sleep = asyncio.sleep

    def approx(x: float) -> object:  # a frozen clock: every wait is exactly its length
        return pytest.approx(x)

    scrapes: list[int] = []
    sleeps: list[float] = []
    ended: list[float] = []

    class Source(StaticMetricsSource):
        async def metrics(self, endpoint: Endpoint) -> str | None:
            scrapes.append(live.inflight_of(endpoint.name))
            return queue_page(0, 0)

    async def endless_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            ended.append(seconds)

    async def settle() -> None:
        for _ in range(10):
            await real_sleep(0)

    monkeypatch.setattr("inferplane.fleet.scraper.asyncio.sleep", endless_sleep)
    scraper = Scraper(live, Source(), interval_s=0.1, max_duty=None, quiet_interval_s=1.0,
                      quiet_busy=quiet_busy, clock=lambda: 0.0)
    task = asyncio.create_task(scraper._scrape_loop(endpoint(live, "eu-0")))
    held: list[Reservation] = []
    try:
        await settle()
        assert scrapes == [0] and sleeps == [approx(0.2)] and ended == []
        if sibling:
            live.set_remote_inflight("eu-0", 1)
        else:
            held.append(live.reserve("eu-0", 10))
        await settle()
        if quiet_busy:
            assert scrapes == [0] and sleeps == [approx(0.2)] and ended == []
        else:  # scraped again at once (a page with nothing on it, one in flight: paced)
            assert scrapes == [0, 1] and ended == [approx(0.2)]
            assert sleeps == [approx(0.2), approx(0.1)]
            assert not live.live["eu-0"].waiters  # nothing left waiting
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for r in held:
            r.release()
        live.set_remote_inflight("eu-0", 0)


@pytest.mark.parametrize("quiet_busy", [False, True])
async def test_a_late_loop_does_not_stretch_the_idle_wait(
    live: LiveFleet, monkeypatch: pytest.MonkeyPatch, quiet_busy: bool
) -> None:
    """The idle wait is timed on the clock: a sleep waking 0.25 s late ends it (no sleep to
    make up for lost time, and none after: a stretched wait could let an idle endpoint read as
    stale); a clock that says the sleep ended early (here: after at most 0.3 s) sleeps what is
    left."""
    now = [0.0]
    Source, fake_sleep, waits = waits_by_scrape([queue_page(0, 0)] * 5, now=now, late_s=0.25)
    monkeypatch.setattr("inferplane.fleet.scraper.asyncio.sleep", fake_sleep)
    scraper = Scraper(live, Source(), interval_s=0.1, max_duty=None, quiet_interval_s=1.0,
                      quiet_busy=quiet_busy, clock=lambda: now[0])
    with pytest.raises(asyncio.CancelledError):
        await scraper._scrape_loop(endpoint(live, "eu-0"))
    assert waits == {1: pytest.approx([0.2]), 2: pytest.approx([0.4]), 3: pytest.approx([0.8]),
                     4: pytest.approx([1.0])}

    now = [0.0]
    Source, fake_sleep, waits = waits_by_scrape([queue_page(0, 0)] * 5, now=now, step_s=0.3)
    monkeypatch.setattr("inferplane.fleet.scraper.asyncio.sleep", fake_sleep)
    scraper = Scraper(live, Source(), interval_s=0.1, max_duty=None, quiet_interval_s=1.0,
                      quiet_busy=quiet_busy, clock=lambda: now[0])
    with pytest.raises(asyncio.CancelledError):
        await scraper._scrape_loop(endpoint(live, "eu-0"))
    assert waits == {1: pytest.approx([0.2]), 2: pytest.approx([0.4, 0.1]),
                     3: pytest.approx([0.8, 0.5, 0.2]), 4: pytest.approx([1.0, 0.7, 0.4, 0.1])}


async def test_a_request_sent_or_ended_during_the_fetch_is_not_idle(live: LiveFleet) -> None:
    """The gateway's count is read at the fetch's start and at its end: a request it sent, or
    one that ended, while the page was being read means the engine was not idle."""
    held: list[Reservation] = []

    class During(StaticMetricsSource):
        async def metrics(self, endpoint: Endpoint) -> str | None:
            if held:
                held.pop().release()
            else:
                held.append(live.reserve("eu-0", 10))
            return queue_page(0, 0)  # the page was rendered before the engine saw it

    scraper = Scraper(live, During(), quiet_interval_s=1.0)
    ep = endpoint(live, "eu-0")
    assert (await scraper._scrape(ep))[2] is None  # sent during the fetch
    assert (await scraper._scrape(ep))[2] is None  # ended during the fetch
    assert (await scraper._scrape(ep))[2] is None  # sent again
    held.pop().release()


@pytest.mark.parametrize(
    ("quiet", "stale", "eject", "cap"),
    [
        (1.0, 2.0, None, 1.0),
        (1.0, 1.0, None, 0.5),  # half of stale_after_s
        (1.0, 2.0, 0.6, 0.3),  # half of stale_eject_s
        (None, 2.0, 0.6, None),  # off stays off
    ],
)
def test_the_idle_wait_stays_under_the_staleness_horizons(
    quiet: float | None, stale: float, eject: float | None, cap: float | None
) -> None:
    assert idle_wait_cap(quiet, stale, eject) == (None if cap is None else pytest.approx(cap))


def test_the_default_quiet_wait_is_three_seconds_and_stays_fresh() -> None:
    """By default an engine only this gateway feeds is scraped every 3 s (session 29: a third
    of the 1-s interval's scrapes on real engines), and a page that old is not stale."""
    from inferplane.config.schema import GatewaySpec

    g = GatewaySpec()
    cap = idle_wait_cap(g.scrape_quiet_interval_s, g.stale_after_s, None)
    assert cap == pytest.approx(3.0)
    assert 2 * cap <= g.stale_after_s


async def test_idle_counts_the_sibling_replicas_requests(live: LiveFleet) -> None:
    """With shared slots, a request another replica of this gateway has in flight on the engine
    means it is not idle, whatever its page said at the time."""
    source = StaticMetricsSource()
    source.texts["eu-0"] = queue_page(0, 0)
    scraper = Scraper(live, source, quiet_interval_s=1.0)
    ep = endpoint(live, "eu-0")
    assert (await scraper._scrape(ep))[2] == "idle"
    live.set_remote_inflight("eu-0", 1)
    assert (await scraper._scrape(ep))[2] is None
    live.set_remote_inflight("eu-0", 0)
    source.texts["eu-0"] = None  # unreadable: cannot tell
    assert (await scraper._scrape(ep))[2] is None


# -- busy engines holding only the gateway's requests (scrape_quiet_busy) ------------------------


@pytest.mark.parametrize(
    ("page", "inflight", "quiet_busy", "kind"),
    [
        ((3, 1), 4, True, "own"),  # all four are the gateway's
        ((2, 0), 4, True, "own"),  # two of the gateway's not on the page yet (or done)
        ((3, 2), 4, True, None),  # one more than the gateway sent: another client's
        ((3, 1), 4, False, None),  # the back-off off: the paced wait
        ((0, 0), 0, False, "idle"),  # idle back-off is not quiet_busy's
        ((1, 0), 0, True, None),  # another client's request on an engine the gateway left
    ],
)
async def test_a_page_of_only_the_gateways_requests_is_its_own(
    live: LiveFleet, page: tuple[int, int], inflight: int, quiet_busy: bool, kind: str | None
) -> None:
    source = StaticMetricsSource()
    source.texts["eu-0"] = queue_page(*page)
    held = [live.reserve("eu-0", 10) for _ in range(inflight)]
    scraper = Scraper(live, source, quiet_interval_s=1.0, quiet_busy=quiet_busy)
    assert (await scraper._scrape(endpoint(live, "eu-0")))[2] == kind
    # read no higher than the gateway's count only with quiet_busy (off: as before)
    assert live.live["eu-0"].metrics_own is (quiet_busy and kind is not None)
    for r in held:
        r.release()


async def test_own_counts_the_gateways_requests_at_either_end_of_the_fetch(
    live: LiveFleet,
) -> None:
    """A page rendered while the gateway's count moved is compared with the larger of its
    counts at the fetch's start and end: a request sent, or ended, during the fetch may be on
    the page."""
    held = [live.reserve("eu-0", 10) for _ in range(3)]

    class During(StaticMetricsSource):
        def __init__(self, send: bool) -> None:
            super().__init__()
            self.send = send

        async def metrics(self, endpoint: Endpoint) -> str | None:
            if self.send:
                held.append(live.reserve("eu-0", 10))
            else:
                held.pop().release()
            return queue_page(4, 0)

    ep = endpoint(live, "eu-0")
    assert (await Scraper(live, During(True), quiet_interval_s=1.0,
                          quiet_busy=True)._scrape(ep))[2] == "own"  # 3 -> 4
    assert (await Scraper(live, During(False), quiet_interval_s=1.0,
                          quiet_busy=True)._scrape(ep))[2] == "own"  # 4 -> 3
    assert (await Scraper(live, During(False), quiet_interval_s=1.0,
                          quiet_busy=True)._scrape(ep))[2] is None  # 3 -> 2: one is not
    for r in held:
        r.release()


@pytest.mark.parametrize(
    ("start", "end", "work", "kind"),
    [
        (0, 1, 0, "own"),  # a request sent during the fetch, not on the page yet
        (0, 1, 1, "own"),  # ... or already on it
        (1, 0, 0, "own"),  # the gateway's last request ended during the fetch
        (1, 0, 1, "own"),  # ... rendered before it ended
        (0, 1, 2, None),  # one more than the gateway ever had: another client's
        (1, 0, 2, None),
    ],
)
async def test_a_fetch_across_the_gateways_first_or_last_request_is_its_own(
    live: LiveFleet, start: int, end: int, work: int, kind: str | None
) -> None:
    """A page read while the gateway's count went from none to some (or from some to none) is
    compared like any other, with the larger of the two ends (the class docstring: "at the
    fetch's start or at its end"); it was not, and such a page sent the back-off back to the
    paced wait: a burst's start or end crossing a fetch on a fleet only this gateway feeds.
    (0 -> 1 with one on the page is the ambiguity 3 -> 4 already accepts: the gateway's, or
    another client's while the gateway's is on its way.)"""
    held = [live.reserve("eu-0", 10) for _ in range(start)]

    class During(StaticMetricsSource):
        async def metrics(self, endpoint: Endpoint) -> str | None:
            if end > start:
                held.append(live.reserve("eu-0", 10))
            else:
                held.pop().release()
            return queue_page(work, 0)

    scraper = Scraper(live, During(), quiet_interval_s=1.0, quiet_busy=True)
    assert (await scraper._scrape(endpoint(live, "eu-0")))[2] == kind
    assert live.live["eu-0"].metrics_own is (kind is not None)
    for r in held:
        r.release()


async def test_busy_engines_holding_only_the_gateways_requests_are_scraped_ever_more_rarely(
    live: LiveFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages showing only the gateway's requests: each wait doubles up to quiet_interval_s, in
    one sleep (one wake-up per wait, not one per paced step), and the gateway's requests (in
    flight all along) do not cut it short; a page with another client's request goes back to
    the paced wait."""
    held = [live.reserve("eu-0", 10) for _ in range(3)]
    pages = [queue_page(2, 1)] * 5 + [queue_page(3, 1), queue_page(2, 1), queue_page(2, 1)]
    now = [0.0]
    Source, fake_sleep, waits = waits_by_scrape(pages, now=now)
    monkeypatch.setattr("inferplane.fleet.scraper.asyncio.sleep", fake_sleep)
    scraper = Scraper(live, Source(), interval_s=0.1, max_duty=None, quiet_interval_s=1.0,
                      quiet_busy=True, clock=lambda: now[0])
    with pytest.raises(asyncio.CancelledError):
        await scraper._scrape_loop(endpoint(live, "eu-0"))
    assert waits == {1: pytest.approx([0.2]), 2: pytest.approx([0.4]), 3: pytest.approx([0.8]),
                     4: pytest.approx([1.0]), 5: pytest.approx([1.0]), 6: pytest.approx([0.1]),
                     7: pytest.approx([0.2])}
    for r in held:
        r.release()


async def test_with_quiet_busy_the_gateways_requests_do_not_end_the_idle_wait(
    live: LiveFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway's first requests to an idle engine end its wait only without quiet_busy
    (`test_the_gateways_first_request_ends_the_idle_wait_at_once`), and its pages showing them
    go back to the paced wait: with it, the next page is expected to show just those requests
    and the wait keeps doubling."""
    held: list[Reservation] = []

    def on_sleep(scrapes: int, sleeps: int) -> None:
        if scrapes == 2 and not held:  # two requests sent during the second idle wait
            held.extend(live.reserve("eu-0", 10) for _ in range(2))

    pages = [queue_page(0, 0), queue_page(0, 0), queue_page(2, 0), queue_page(2, 0)]
    for quiet_busy, expect in ((False, {1: 0.2, 2: 0.4, 3: 0.1}),
                               (True, {1: 0.2, 2: 0.4, 3: 0.8})):
        now = [0.0]
        Source, fake_sleep, waits = waits_by_scrape(pages, on_sleep, now=now)
        monkeypatch.setattr("inferplane.fleet.scraper.asyncio.sleep", fake_sleep)
        scraper = Scraper(live, Source(), interval_s=0.1, max_duty=None, quiet_interval_s=1.0,
                          quiet_busy=quiet_busy, clock=lambda now=now: now[0])
        with pytest.raises(asyncio.CancelledError):
            await scraper._scrape_loop(endpoint(live, "eu-0"))
        assert {k: round(sum(v), 6) for k, v in waits.items()} == expect, quiet_busy
        for r in held:
            r.release()
        held.clear()


def test_an_own_page_reads_no_more_requests_than_the_gateway_has_in_flight(
    live: LiveFleet,
) -> None:
    """A page that held only the gateway's requests does not outlive them: while it is the
    latest, its running and waiting are read no higher than the gateway's count; another
    page (one with other clients' requests) is read as it is."""
    held = [live.reserve("eu-0", 10) for _ in range(8)]
    live.update_metrics("eu-0", EngineMetrics(running=6.0, waiting=2.0, kv_usage=0.5), own=True)
    s = live.snapshot().by_name["eu-0"].state
    assert (s.running, s.waiting) == (6.0, 2.0)
    for r in held[3:]:  # five end
        r.release()
    s = live.snapshot().by_name["eu-0"].state
    assert (s.running, s.waiting, s.kv_usage) == (3.0, 0.0, 0.5)
    held[2].release()
    held[1].release()
    live.update_metrics("eu-0", EngineMetrics(running=1.0, waiting=3.0), own=True)
    s = live.snapshot().by_name["eu-0"].state
    assert (s.running, s.waiting) == (1.0, 0.0)
    live.update_metrics("eu-0", EngineMetrics(running=6.0, waiting=2.0))
    s = live.snapshot().by_name["eu-0"].state
    assert (s.running, s.waiting) == (6.0, 2.0)  # not the gateway's alone: as it reads
    held[0].release()


async def test_scrape_pacing_times_the_fetch_not_the_parse(
    live: LiveFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsing the page is the gateway's work, not the engine's: it does not stretch the wait."""
    from inferplane.fleet import scraper as scraper_mod

    t = [0.0]

    class Fast(StaticMetricsSource):
        async def metrics(self, endpoint: Endpoint) -> str | None:
            t[0] += 0.001
            return VLLM

    parse = scraper_mod.parse_metrics

    def slow_parse(engine: str, text: str) -> EngineMetrics:
        t[0] += 0.2  # a busy gateway: 0.2 s to parse
        return parse(engine, text)

    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 2:
            raise asyncio.CancelledError

    monkeypatch.setattr(scraper_mod, "parse_metrics", slow_parse)
    monkeypatch.setattr(scraper_mod.asyncio, "sleep", fake_sleep)
    scraper = Scraper(live, Fast(), interval_s=0.1, max_duty=0.05, max_interval_s=0.5,
                      clock=lambda: t[0])
    with pytest.raises(asyncio.CancelledError):
        await scraper._scrape_loop(endpoint(live, "eu-0"))
    assert slept == [0.1, 0.1]  # timed with the parse: 0.201 s -> 0.5 each


async def test_scrape_pacing_counts_the_gateways_running_time(
    live: LiveFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a loop-lag meter, a fetch that took 0.2 s of wall time while the gateway's loop lost
    0.19 s to lag counts 0.01 s of the engine's time."""
    from inferplane.looplag import LoopLag

    wall, lost = [0.0], [0.0]

    class Lag(LoopLag):
        @property
        def running(self) -> bool:
            return True

        def mark(self) -> tuple[float, float]:
            return wall[0], lost[0]

        def ran_s(self, mark: tuple[float, float]) -> float:
            return (wall[0] - mark[0]) - (lost[0] - mark[1])

    class Lagged(StaticMetricsSource):
        async def metrics(self, endpoint: Endpoint) -> str | None:
            wall[0] += 0.2
            lost[0] += 0.19
            return VLLM

    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        raise asyncio.CancelledError

    monkeypatch.setattr("inferplane.fleet.scraper.asyncio.sleep", fake_sleep)
    scraper = Scraper(live, Lagged(), interval_s=0.1, max_duty=0.05, max_interval_s=0.5,
                      clock=lambda: wall[0], lag=Lag())
    with pytest.raises(asyncio.CancelledError):
        await scraper._scrape_loop(endpoint(live, "eu-0"))
    assert slept == pytest.approx([0.19])  # 0.01 x 19; by wall time 0.2 s -> 0.5


async def test_prime_scrapes_and_probes_every_endpoint(live: LiveFleet) -> None:
    source = StaticMetricsSource()
    source.texts = {"eu-0": VLLM, "us-0": VLLM}
    source.health = {"eu-1": False}
    await Scraper(live, source).prime()
    by = live.snapshot().by_name
    assert not by["eu-0"].state.stale and not by["us-0"].state.stale and by["eu-1"].state.stale
    assert by["eu-0"].state.healthy and not by["eu-1"].state.healthy


async def test_loops_start_and_stop(live: LiveFleet) -> None:
    source = StaticMetricsSource()
    source.texts["eu-1"] = VLLM
    source.health["us-0"] = False
    scraper = Scraper(live, source, interval_s=0.001, health_interval_s=0.001, failures_to_down=2)
    scraper.start()
    try:
        for _ in range(200):
            by = live.snapshot().by_name
            if by["eu-1"].state.running == 25.0 and not by["us-0"].state.healthy:
                break
            await asyncio.sleep(0.001)
    finally:
        await scraper.stop()
    by = live.snapshot().by_name
    assert by["eu-1"].state.running == 25.0
    assert not by["us-0"].state.healthy
    assert not scraper._tasks


async def test_a_failing_scrape_does_not_kill_the_loop(
    live: LiveFleet, caplog: pytest.LogCaptureFixture
) -> None:
    class Flaky(StaticMetricsSource):
        calls = 0

        async def metrics(self, ep: Endpoint) -> str | None:
            if ep.name != "eu-0":
                return None
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("parser bug")
            return VLLM

    scraper = Scraper(live, Flaky(), interval_s=0.001)
    scraper.start()
    try:
        for _ in range(200):
            if live.snapshot().by_name["eu-0"].state.running == 25.0:
                break
            await asyncio.sleep(0.001)
    finally:
        await scraper.stop()
    assert live.snapshot().by_name["eu-0"].state.running == 25.0
    assert "scrape of eu-0 failed" in caplog.text


# -- probes skipped while the endpoint serves (health_skip_while_serving) ------------------------


def test_served_since_needs_a_success_and_no_failure_after_the_mark(
    live: LiveFleet, clock: Clock
) -> None:
    assert not live.served_since("eu-0", float("-inf"))  # nothing yet
    live.observe_outcome("eu-0", True)
    assert live.served_since("eu-0", clock.t - 1)
    assert not live.served_since("eu-0", clock.t)  # not after the mark
    clock.t += 1
    live.observe_outcome("eu-0", False)
    clock.t += 1
    live.observe_outcome("eu-0", True)
    assert not live.served_since("eu-0", clock.t - 1.5)  # a failure since
    assert live.served_since("eu-0", clock.t - 0.5)
    clock.t += 1
    live.observe_outcome("eu-0", False, consecutive=False)  # a 429 or a client gone: neither
    assert live.served_since("eu-0", clock.t - 1.5)


async def probe_turns(
    live: LiveFleet, clock: Clock, monkeypatch: pytest.MonkeyPatch, *, skip: bool,
    answers: list[bool], traffic: dict[int, list[bool]], turns: int, window: float = 0.0,
    gap: float = 1.0, at: float | None = None, scrapes: dict[int, list[str | None]] | None = None,
    scraped: bool = True, later: dict[int, list[bool]] | None = None,
) -> list[int]:
    """Run the probe loop of eu-0 (``health_interval_s`` 1, ``skip_window_s`` ``window``) for
    ``turns`` + 1 turns, ``gap`` s apart on ``clock`` (more than 1: late turns); before turn k
    (during the wait after turn k - 1, ``at`` s into it, None: at its end) the outcomes
    ``traffic[k]`` are observed, then eu-0 is scraped once per page of ``scrapes[k]`` (None: no
    page), as an endpoint with ``scrape_metrics`` ``scraped``, and 0.25 s after them the
    outcomes ``later[k]``; the probes answer ``answers`` in turn. Returns the turns that
    probed."""
    probed: list[int] = []
    turn = [0]
    left = iter(answers)
    ep = endpoint(live, "eu-0")
    scrape_ep = dataclasses.replace(
        ep, spec=ep.spec.model_copy(update={"scrape_metrics": scraped}))

    class Source(StaticMetricsSource):
        async def healthy(self, endpoint: Endpoint) -> bool:
            probed.append(turn[0])
            return next(left)

    source = Source()

    async def fake_sleep(seconds: float) -> None:
        turn[0] += 1
        if turn[0] > turns:
            raise asyncio.CancelledError
        lead = gap if at is None else at
        clock.t += lead
        for ok in traffic.get(turn[0], []):
            live.observe_outcome("eu-0", ok)
        for page in (scrapes or {}).get(turn[0], []):
            source.texts["eu-0"] = page
            assert await scraper.scrape_once(scrape_ep) == (scraped and page is not None)
        after = (later or {}).get(turn[0])
        if after is not None:
            clock.t += 0.25
            lead += 0.25
            for ok in after:
                live.observe_outcome("eu-0", ok)
        clock.t += gap - lead

    monkeypatch.setattr("inferplane.fleet.scraper.asyncio.sleep", fake_sleep)
    scraper = Scraper(live, source, health_interval_s=1.0, failures_to_down=2,
                      skip_probe_while_serving=skip, skip_window_s=window)
    with pytest.raises(asyncio.CancelledError):
        await scraper._health_loop(endpoint(live, "eu-0"))
    return probed


@pytest.mark.parametrize("skip", [True, False])
async def test_a_serving_endpoint_is_not_probed(
    live: LiveFleet, clock: Clock, monkeypatch: pytest.MonkeyPatch, skip: bool
) -> None:
    """Each turn of the probe loop probes unless, with the skip on, the endpoint answered a
    request since the last turn and failed none."""
    probed = await probe_turns(
        live, clock, monkeypatch, skip=skip, answers=[True] * 7, turns=6,
        traffic={1: [True], 2: [True, True], 3: [True, False], 4: [], 5: [True]})
    # turn 0: no traffic yet; 1, 2: served; 3: a failure; 4: no traffic; 5: served; 6: none
    assert probed == ([0, 3, 4, 6] if skip else [0, 1, 2, 3, 4, 5, 6])


async def test_a_skipped_probe_passes_and_an_unhealthy_endpoint_is_always_probed(
    live: LiveFleet, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A skipped turn counts as a passed probe (one failed probe before it does not add up with
    one after it), and an endpoint marked down is probed even while requests there succeed (a
    verdict changes only on probes)."""
    probed = await probe_turns(live, clock, monkeypatch, skip=True, turns=5,
                               answers=[False, False, True],
                               traffic={1: [True], 3: [True], 4: [True]})
    # 0: fails (1 of 2); 1: served, skipped, passes; 2: fails (1 of 2 again: had the skip not
    # reset the count, it would be 2 of 2, down); 3, 4: served, skipped; 5: probed, passes
    assert probed == [0, 2, 5]
    assert live.is_healthy("eu-0")

    live.set_health("eu-0", False)
    probed = await probe_turns(live, clock, monkeypatch, skip=True, turns=5,
                               answers=[False, True, True, True, True],
                               traffic={1: [True], 2: [True]})
    # 0: down, fails; 1: served but down: probed (passes, up again); 2: served, up: skipped
    assert probed == [0, 1, 3, 4, 5]
    assert live.is_healthy("eu-0")


@pytest.mark.parametrize(("window", "expected"), [(3.0, [0, 4, 5]), (1.0, [0, 2, 3, 4, 5])])
async def test_an_answer_skips_probes_for_the_window(
    live: LiveFleet, clock: Clock, monkeypatch: pytest.MonkeyPatch, window: float,
    expected: list[int],
) -> None:
    """With ``skip_window_s`` 3, one answer (before turn 1) skips the probes of turns 1 to 3,
    where a window of one turn skips turn 1's only; turn 4 is past it."""
    probed = await probe_turns(live, clock, monkeypatch, skip=True, answers=[True] * 6,
                               traffic={1: [True]}, turns=5, window=window)
    assert probed == expected


async def test_an_idle_endpoint_is_probed_every_interval_whatever_the_window(
    live: LiveFleet, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    probed = await probe_turns(live, clock, monkeypatch, skip=True, answers=[True] * 6,
                               traffic={}, turns=5, window=3.0)
    assert probed == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize(("after", "expected"),
                         [([True], [0, 3, 7]), ([True, False], [0, 3, 4, 7])])
async def test_a_failure_in_the_window_forces_the_probe_until_one_passes(
    live: LiveFleet, clock: Clock, monkeypatch: pytest.MonkeyPatch, after: list[bool],
    expected: list[int],
) -> None:
    """Turn 2 is skipped on turn 1's answer (the window); a failure before turn 3 forces its
    probe, which passes: the failure no longer counts, and the answer before turn 4 skips
    turns 4 to 6 (its window); turn 7 is past it. A failure after the answer (before turn 4)
    forces turn 4's probe in turn, which lifts it again."""
    probed = await probe_turns(live, clock, monkeypatch, skip=True, answers=[True] * 8,
                               traffic={1: [True], 3: [False], 4: after}, turns=7,
                               window=3.0)
    assert probed == expected


async def test_a_failure_forces_the_probes_while_they_fail(
    live: LiveFleet, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure before turn 2 forces its probe, which fails (1 of 2): turn 3 is probed too
    (the answer is older than the failed probe) and, failing, marks the endpoint down."""
    probed = await probe_turns(live, clock, monkeypatch, skip=True,
                               answers=[True, False, False, True], turns=3, window=3.0,
                               traffic={1: [True], 2: [False]})
    assert probed == [0, 2, 3]
    assert not live.is_healthy("eu-0")


@pytest.mark.parametrize(("window", "traffic", "pages", "scraped", "expected"), [
    # no page: turn 2 probed; it passes, and turn 3 is skipped again
    (3.0, {1: [True]}, [None], True, [0, 2, 4, 5]),
    (3.0, {1: [True]}, [VLLM], True, [0, 4, 5]),  # a page: nothing forced
    (3.0, {1: [True]}, [None], False, [0, 4, 5]),  # scrape_metrics false: not scraped
    # a window of one turn skips as before it existed: turn 2 on the answer since turn 1
    (1.0, {2: [True]}, [None], True, [0, 1, 3, 4, 5]),
])
async def test_a_failed_scrape_forces_the_next_probe(
    live: LiveFleet, clock: Clock, monkeypatch: pytest.MonkeyPatch, window: float,
    traffic: dict[int, list[bool]], pages: list[str | None], scraped: bool,
    expected: list[int],
) -> None:
    """An answer before turn 1 skips turns 1 to 3 (a 3-s window); a scrape that reads no
    page before turn 2 (the engine may be dead: its requests would fail, but none comes)
    forces that turn's probe."""
    probed = await probe_turns(live, clock, monkeypatch, skip=True, answers=[True] * 6,
                               traffic=traffic, turns=5, window=window, scrapes={2: pages},
                               scraped=scraped)
    assert probed == expected


@pytest.mark.parametrize(("later", "expected"), [
    ({2: [True]}, [0, 5]),  # answered after the failed scrape: skipped as before
    # nothing after it: forced (the answer is older than the scrape); it passes, and the
    # answer at 0.5 s skips turn 3 (vouched), turn 4 is past its window
    ({}, [0, 2, 4, 5]),
    ({2: [False]}, [0, 2, 4, 5]),  # a failed request after it: forced too, then the same
])
async def test_an_answer_after_a_failed_scrape_still_skips_the_probe(
    live: LiveFleet, clock: Clock, monkeypatch: pytest.MonkeyPatch,
    later: dict[int, list[bool]], expected: list[int],
) -> None:
    """A failed scrape counts as a failed probe's turn, not as a failed request: an answer
    before turn 1 (at 0.5 s) skips turn 1; a scrape that gets no answer at 1.5 s leaves only
    answers after it to skip. One at 1.75 s (a loaded engine whose ``/metrics`` timed out
    while it answers) skips turns 2 to 4 (its 3-s window); turn 5 is past it."""
    probed = await probe_turns(live, clock, monkeypatch, skip=True, answers=[True] * 6,
                               traffic={1: [True]}, turns=5, window=3.0, at=0.5,
                               scrapes={2: [None]}, later=later)
    assert probed == expected


async def test_answers_before_a_failed_probe_skip_none(
    live: LiveFleet, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint marked down answers before turn 1 (a request already there); its probes
    fail at turns 0 to 2 and pass at turn 3 (up again). Turn 4 is probed: the answer is in the
    window (4 s) but older than the failed probe of turn 2."""
    live.set_health("eu-0", False)
    probed = await probe_turns(live, clock, monkeypatch, skip=True,
                               answers=[False, False, False, True, True, True],
                               traffic={1: [True]}, turns=5, window=4.0)
    assert probed == [0, 1, 2, 3, 4, 5]
    assert live.is_healthy("eu-0")


@pytest.mark.parametrize("window", [0.0, 0.5, 1.0])
async def test_a_window_no_longer_than_the_interval_skips_as_the_previous_turn_did(
    live: LiveFleet, clock: Clock, monkeypatch: pytest.MonkeyPatch, window: float
) -> None:
    """Turns 1.5 s apart (late): an answer 0.1 s after a turn skips the next turn, 1.4 s
    later, as it did before the window existed (the window reaches back to the previous turn,
    not ``window`` or ``health_interval_s`` back)."""
    probed = await probe_turns(live, clock, monkeypatch, skip=True, answers=[True] * 6,
                               traffic={2: [True], 4: [True]}, turns=5, window=window,
                               gap=1.5, at=0.1)
    assert probed == [0, 1, 3, 5]


def test_only_a_2xx_answer_counts_as_served(live: LiveFleet, clock: Clock) -> None:
    """A 4xx reaches the end of a request without an endpoint fault (ok for the error rate) but
    is not what a health probe asks; a 2xx is."""
    live.observe_outcome("eu-0", True, served=False)
    assert not live.served_since("eu-0", clock.t - 1)
    live.observe_outcome("eu-0", True, served=True)
    assert live.served_since("eu-0", clock.t - 1)


def test_the_removed_metrics_age_s_says_what_replaces_it() -> None:
    """A plugin written against the old `EndpointState.metrics_age_s` gets an AttributeError
    that names `metrics_age_at` (the state holds the page's time, ``metrics_at``, now)."""
    state = EndpointState(metrics_at=10.0)
    with pytest.raises(AttributeError, match=r"metrics_age_at\(snapshot\.now\)"):
        _ = state.metrics_age_s
    assert state.metrics_age_at(12.5) == 2.5
