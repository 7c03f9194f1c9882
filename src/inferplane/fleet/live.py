"""The mutable side of fleet state: what scrapers and the gateway's own traffic report.

`LiveFleet` owns one `EndpointLive` per endpoint and hands out immutable `FleetSnapshot` objects.
A snapshot is rebuilt only when something changed (a version counter) or when staleness may have
changed (every ``refresh_s``), so the request path usually gets a cached object.
"""

from __future__ import annotations

import asyncio
import math
import time
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import count, repeat

from inferplane.fleet.engine_metrics import EngineMetrics
from inferplane.fleet.model import Endpoint, Fleet
from inferplane.fleet.state import (
    EndpointState,
    EndpointView,
    FleetSnapshot,
    PrefixIndexView,
    SnapshotLog,
)

Clock = Callable[[], float]

SCRAPE_HISTORY = 512  # scrapes kept per endpoint: 51 s at the default 0.1 s scrape interval
RATE_WINDOW_S = 60.0  # declared rate limits are per rolling minute
# decayed failures below this weight count as none (`EndpointLive.error_rate_at`): the rate is
# under 1e-6 then, an expected 1.000001 attempts against 1, and without the floor one failure
# kept the endpoint's state moving (`LiveFleet._unchanged`) until the float underflowed, about
# 1,075 half-lives (3 hours at the default 10 s)
ERROR_FLOOR = 1e-6


class RateWindow:
    """Requests and tokens sent to one endpoint in the last `RATE_WINDOW_S` seconds, against
    its declared limits (None: no limit of that kind)."""

    __slots__ = ("_sent", "requests_per_min", "tokens", "tokens_per_min")

    def __init__(self, requests_per_min: int | None, tokens_per_min: int | None) -> None:
        self.requests_per_min = requests_per_min
        self.tokens_per_min = tokens_per_min
        self._sent: deque[tuple[float, int]] = deque()
        self.tokens = 0

    def add(self, now: float, tokens: int) -> None:
        self._sent.append((now, tokens))
        self.tokens += tokens

    def _expire(self, now: float) -> None:
        sent = self._sent
        while sent and sent[0][0] <= now - RATE_WINDOW_S:
            self.tokens -= sent.popleft()[1]

    def left(self, now: float) -> tuple[int | None, int | None]:
        """(requests left, tokens left) in the window at ``now``; None where unlimited."""
        self._expire(now)
        rpm, tpm = self.requests_per_min, self.tokens_per_min
        return (
            None if rpm is None else max(0, rpm - len(self._sent)),
            None if tpm is None else max(0, tpm - self.tokens),
        )

    def next_room_s(self, now: float) -> float:
        """Seconds until the oldest request in the window leaves it (0 when empty)."""
        self._expire(now)
        return 0.0 if not self._sent else self._sent[0][0] + RATE_WINDOW_S - now


def nearest_rank(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values, q in [0, 100] (the gateway's rule for
    every percentile it reports; the simulator's report interpolates instead)."""
    k = min(len(sorted_values) - 1, max(0, round(q / 100.0 * (len(sorted_values) - 1))))
    return sorted_values[k]


class LatencyWindow:
    """The last ``size`` samples; percentiles from a sorted copy, kept until a new sample.

    After a few new samples the sorted copy is brought up to date instead of re-sorted: each
    sample the window dropped is taken out of it and each new one put in (by bisection), which
    gives the same list as sorting the window afresh (a window of 1,024 ITL samples sorts in
    ~35 µs; the sixteen samples of one request move in a few). That is done only while every
    sample is positive (equal positive floats are the same number, so where an equal one goes
    cannot matter; a zero's sign could, and a NaN sorts by no order) and for up to ``size // 8``
    new samples; otherwise the window is sorted afresh."""

    __slots__ = ("_added", "_cache", "_dropped", "_samples", "_update")

    def __init__(self, size: int = 256) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self._cache: list[float] | None = None
        # since ``_cache`` was sorted: the samples added, and those the window dropped for them;
        # ``_update``: whether ``_cache`` may be brought up to date with them
        self._added: list[float] = []
        self._dropped: list[float] = []
        self._update = False

    def add(self, value: float) -> None:
        s = self._samples
        if self._cache is not None:
            if self._update and value > 0 and len(self._added) < (s.maxlen or 0) // 8:
                if len(s) == s.maxlen:
                    self._dropped.append(s[0])
                self._added.append(value)
            else:
                self._reset()
        s.append(value)

    def _reset(self) -> None:
        self._cache = None
        self._added.clear()
        self._dropped.clear()

    def add_many(self, value: float, n: int) -> None:
        """``n`` equal samples at once (the same window as ``n`` calls of `add`)."""
        if n > 0:
            self._samples.extend(repeat(value, min(n, self._samples.maxlen or n)))
            self._reset()

    def __len__(self) -> int:
        return len(self._samples)

    def values(self) -> list[float]:
        """The samples held, oldest first (a copy)."""
        return list(self._samples)

    def clear(self) -> None:
        self._samples.clear()
        self._reset()

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile, q in [0, 100]; None without samples."""
        if not self._samples:
            return None
        cache = self._cache
        if cache is None:
            cache = self._cache = sorted(self._samples)
            total = sum(cache)  # NaN when a sample is
            self._update = cache[0] > 0 and total == total
        elif self._added:
            for v in self._dropped:
                del cache[bisect_left(cache, v)]
            for v in self._added:
                insort(cache, v)
            self._added.clear()
            self._dropped.clear()
        return nearest_rank(cache, q)


@dataclass(slots=True)
class Reservation:
    """In-flight capacity taken at pick; `release` is idempotent (exactly-once).

    ``prefill_tokens`` (the uncached prompt tokens placement expected) count as the endpoint's
    pending prefill work until `first_token` — or `release`, whichever comes first — so the
    latency predictor sees the prefill queue ahead of a new request. A request whose first token
    nobody here sees (a non-streamed answer arrives whole, at its end) calls `prefill_within`
    with its predicted TTFT instead. ``prefill_end``: when its first token was expected at
    reservation (on the live fleet's clock), or None when nobody predicted it; the latest of
    those over an endpoint's pending requests is its `EndpointState.prefill_done_at`.
    ``prefill_key``: this reservation's own entry in `EndpointLive.prefill_ends`.
    """

    fleet: LiveFleet
    endpoint: str
    tokens: int
    prefill_tokens: int = 0
    released: bool = False
    on_release: Callable[[], None] | None = None  # e.g. give back a shared in-flight slot
    prefilled: bool = False
    # the endpoint's live record when reserved: a fleet reload that replaces the endpoint (or
    # removes it) does not move this request's counts onto another record
    record: EndpointLive | None = None
    on_first_token: Callable[[], None] | None = None  # e.g. admission's prefill count
    timer: asyncio.TimerHandle | None = None  # `prefill_within`'s
    prefill_end: float | None = None
    prefill_key: int | None = None

    def prefill_within(self, delay_s: float) -> None:
        """End this request's prefill ``delay_s`` from now (its predicted TTFT), or at its first
        token or release if sooner; without a running event loop, only at those."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.timer = loop.call_later(max(0.0, delay_s), self.first_token)

    def first_token(self) -> None:
        """The first token arrived: this request's prefill is no longer ahead of anyone."""
        if not self.prefilled:
            self.prefilled = True
            if self.on_first_token is not None:
                self.on_first_token()
            self.fleet._prefilled(
                self.endpoint, self.prefill_tokens, self.record, self.prefill_key
            )

    def release(self) -> None:
        if not self.released:
            if self.timer is not None:
                self.timer.cancel()
            self.first_token()
            self.released = True
            if self.on_release is not None:
                self.on_release()
            self.fleet._release(self.endpoint, self.tokens, self.record)


class EndpointLive:
    """Mutable live record for one endpoint."""

    __slots__ = (
        "consecutive_failures",
        "consecutive_timeouts",
        "decayed_at",
        "decayed_errors",
        "decayed_outcomes",
        "dirty",
        "ejected",
        "ejected_reason",
        "healthy",
        "inflight",
        "inflight_tokens",
        "itl",
        "last_fail_at",
        "last_ok_at",
        "metrics",
        "metrics_at",
        "metrics_own",
        "outcomes",
        "pending_prefill",
        "pending_prefill_sq",
        "pending_prefill_tokens",
        "prefill_ends",
        "prefill_unpredicted",
        "rate",
        "remote_inflight",
        "requests_total",
        "scrapes",
        "stats",
        "stats_at",
        "ttft",
        "ttft_ratio",
        "waiters",
    )

    @property
    def all_inflight(self) -> int:
        """In flight on the endpoint from this gateway and its sibling replicas (shared
        slots): what snapshots report as ``inflight``."""
        return self.inflight + self.remote_inflight

    def __init__(self, rate: RateWindow | None = None) -> None:
        self.rate = rate  # declared rate limits, when the endpoint has any
        self.metrics: EngineMetrics | None = None
        self.metrics_at: float | None = None
        self.healthy = True
        self.ejected = False
        self.ejected_reason = ""
        self.inflight = 0
        self.inflight_tokens = 0
        self.remote_inflight = 0  # other replicas' in-flight requests (shared slots)
        # done when the endpoint next has a request in flight (`LiveFleet.inflight_started`)
        self.waiters: set[asyncio.Future[None]] = set()
        self.pending_prefill = 0
        self.pending_prefill_tokens = 0
        self.pending_prefill_sq = 0  # sum of the pending prompts' squared uncached lengths
        # the pending requests' expected first-token times (by reservation key), and how many
        # have none
        self.prefill_ends: dict[int, float] = {}
        self.prefill_unpredicted = 0
        self.ttft = LatencyWindow()
        self.ttft_ratio = LatencyWindow(128)  # observed ÷ predicted TTFT, per request
        self.itl = LatencyWindow(1024)
        # (time, ok) of the last 100 attempts: the outlier sweep's window (`fleet.health`)
        self.outcomes: deque[tuple[float, bool]] = deque(maxlen=100)
        # exponentially time-decayed failures and attempts (half-life ``error_half_life_s``),
        # as of ``decayed_at``: placement's error rate (`error_rate_at`)
        self.decayed_errors = 0.0
        self.decayed_outcomes = 0.0
        self.decayed_at = 0.0
        self.consecutive_failures = 0  # failures since the last success (any kind)
        self.consecutive_timeouts = 0  # first-byte timeouts since the last success
        # when an attempt last succeeded / failed (consecutive-counting outcomes only): what a
        # health probe would have learnt (`fleet.scraper.Scraper`, skip_probe_while_serving)
        self.last_ok_at = float("-inf")
        self.last_fail_at = float("-inf")
        self.requests_total = 0
        # the last page held only this gateway's requests (`fleet.scraper.Scraper`): its
        # running and waiting are read no higher than the gateway's count (`LiveFleet.state_of`)
        self.metrics_own = False
        # (time, waiting, kv_usage) of recent scrapes: the trend history `fleet.health` reads
        self.scrapes: deque[tuple[float, float | None, float | None]] = deque(
            maxlen=SCRAPE_HISTORY
        )
        self.dirty = True
        self.stats: tuple[
            float | None, float | None, float | None, float | None, float, float | None
        ] = (None, None, None, None, 0.0, None)
        self.stats_at = float("-inf")

    def add_outcome(self, now: float, ok: bool, half_life_s: float) -> None:
        """One attempt's outcome at ``now``: into the sweep's window and the decayed sums."""
        self.outcomes.append((now, ok))
        d = math.pow(0.5, max(0.0, now - self.decayed_at) / half_life_s)
        self.decayed_errors = self.decayed_errors * d + (0.0 if ok else 1.0)
        self.decayed_outcomes = self.decayed_outcomes * d + 1.0
        self.decayed_at = now

    def error_rate_at(self, now: float, half_life_s: float) -> float:
        """Placement's error rate: failures ÷ attempts, each weighted ``0.5^(age ÷ half-life)``,
        over at least one attempt's weight — ``F / max(T, 1)`` of the decayed sums. While the
        evidence is recent it is the share of failures; once it has aged below one attempt's
        worth it falls towards 0, so an endpoint that the term steered away from (and so gets
        no new outcomes) is tried again instead of being starved for good."""
        if self.decayed_errors <= 0.0:
            return 0.0
        d = math.pow(0.5, max(0.0, now - self.decayed_at) / half_life_s)
        errors = self.decayed_errors * d
        if errors < ERROR_FLOOR:  # flushed: a rate under it for good, not 0 after ~3 hours
            self.decayed_errors = 0.0
            return 0.0
        return errors / max(self.decayed_outcomes * d, 1.0)

    def refresh_stats(self, now: float, half_life_s: float) -> None:
        """Recompute the latency percentiles and error rate (sorting: done at most every
        ``refresh_s``, not on every snapshot)."""
        self.stats = (
            self.ttft.percentile(50),
            self.ttft.percentile(99),
            self.itl.percentile(50),
            self.itl.percentile(99),
            self.error_rate_at(now, half_life_s),
            self.ttft_ratio.percentile(50),
        )
        self.stats_at = now


def _wake(rec: EndpointLive) -> None:
    """Complete the futures waiting for a request in flight on ``rec``'s endpoint."""
    waiters, rec.waiters = rec.waiters, set()
    for fut in waiters:
        if not fut.done():
            fut.set_result(None)


def _record(endpoint: Endpoint) -> EndpointLive:
    lim = endpoint.spec.limits
    rate = None
    if lim.requests_per_min is not None or lim.tokens_per_min is not None:
        rate = RateWindow(lim.requests_per_min, lim.tokens_per_min)
    return EndpointLive(rate)


class LiveFleet:
    """Live state of every endpoint, and the snapshot factory placement reads from."""

    def __init__(
        self,
        fleet: Fleet,
        *,
        stale_after_s: float = 2.0,
        clock: Clock = time.monotonic,
        refresh_s: float = 0.05,
        prefix_index: PrefixIndexView | None = None,
        error_half_life_s: float = 10.0,
    ) -> None:
        self.fleet = fleet
        self.stale_after_s = stale_after_s
        self.error_half_life_s = error_half_life_s
        self.clock = clock
        self.refresh_s = refresh_s
        self.prefix_index = prefix_index
        self.live: dict[str, EndpointLive] = {e.name: _record(e) for e in fleet.endpoints}
        self._version = 0
        self._snapshot: FleetSnapshot | None = None
        self._snapshot_at = 0.0
        self._prefill_keys = count()  # `Reservation.prefill_key`
        # the endpoints written to since the last snapshot (each once: added as its record
        # turns dirty), and each endpoint's position in the snapshots of ``fleet``: a snapshot
        # between full refreshes rebuilds just those views (`snapshot`)
        self._touched: list[str] = []
        self._positions: dict[str, int] = {}
        # what each snapshot replaced, for readers that keep sums over the views
        self._serial = 0
        self._log = SnapshotLog()
        # told the endpoint's name when a request's first token arrives (its prefill is done):
        # admission's dispatch gate re-checks its queue
        self.on_prefilled: Callable[[str], None] | None = None

    def reconfigure(self, fleet: Fleet) -> tuple[list[str], list[str]]:
        """Swap in a reloaded fleet; return the names of (fresh, removed) endpoints.

        An endpoint of the same name and URL keeps its live record (in-flight counts, health,
        ejection, latency windows and corrections, scrapes); its declared rate limits follow the
        new definition. A new endpoint, or one whose URL changed, starts from a fresh record.
        A removed endpoint leaves the snapshot (nothing new is placed on it); its record stays
        readable until its requests in flight have drained, so they account as usual."""
        old = {e.name: e for e in self.fleet.endpoints}
        live: dict[str, EndpointLive] = {}
        fresh: list[str] = []
        for e in fleet.endpoints:
            prev = old.get(e.name)
            rec = self.live.get(e.name)
            if prev is not None and rec is not None and prev.url == e.url:
                if prev.spec.limits != e.spec.limits:
                    rec.rate = _record(e).rate
                live[e.name] = rec
            else:
                live[e.name] = _record(e)
                fresh.append(e.name)
            live[e.name].dirty = True
        removed = [n for n in old if n not in live]
        for name, rec in self.live.items():  # draining: kept until their in-flight ends
            if name not in live and rec.inflight > 0:
                live[name] = rec
        self.fleet = fleet
        self.live = live
        self._version += 1
        self._snapshot = None
        return fresh, removed

    # -- writers ---------------------------------------------------------------------------
    def _record_of(self, endpoint: str) -> EndpointLive:
        """The endpoint's record; a throwaway one for an endpoint a reload removed whose
        requests have all drained (a late observation of it goes nowhere)."""
        rec = self.live.get(endpoint)
        return rec if rec is not None else EndpointLive()

    def _touch(self, rec: EndpointLive, endpoint: str) -> None:
        if not rec.dirty:
            rec.dirty = True
            self._touched.append(endpoint)
        self._version += 1

    def update_metrics(self, endpoint: str, metrics: EngineMetrics, *, own: bool = False) -> None:
        """The endpoint's scraped page; ``own``: it showed no request but this gateway's (its
        replicas' included), so while it is the latest, its running and waiting are read no
        higher than the requests the gateway has in flight there at the time (a page kept
        through the scrape back-off does not outlive the requests it showed)."""
        rec = self._record_of(endpoint)
        rec.metrics = metrics
        rec.metrics_own = own
        rec.metrics_at = now = self.clock()
        rec.scrapes.append((now, metrics.waiting, metrics.kv_usage))
        self._touch(rec, endpoint)

    def set_health(self, endpoint: str, healthy: bool) -> None:
        rec = self._record_of(endpoint)
        if rec.healthy != healthy:
            rec.healthy = healthy
            self._touch(rec, endpoint)

    def set_ejected(self, endpoint: str, ejected: bool, reason: str = "") -> None:
        rec = self._record_of(endpoint)
        if rec.ejected != ejected or rec.ejected_reason != reason:
            rec.ejected, rec.ejected_reason = ejected, reason
            self._touch(rec, endpoint)

    def reset_observations(self, endpoint: str) -> None:
        """Forget the endpoint's observed outcomes, TTFTs and TTFT ÷ prediction ratios (an
        ejected endpoint returning on probation is judged only on what it does after its return,
        and its predictions are not inflated by the slowness that got it ejected)."""
        rec = self._record_of(endpoint)
        rec.outcomes.clear()
        rec.decayed_errors = rec.decayed_outcomes = 0.0
        rec.consecutive_failures = rec.consecutive_timeouts = 0
        rec.ttft.clear()
        rec.ttft_ratio.clear()
        rec.stats_at = float("-inf")
        self._touch(rec, endpoint)

    def reserve(
        self, endpoint: str, tokens: int, prefill_tokens: int = 0, ttft_s: float | None = None
    ) -> Reservation:
        """Take one in-flight slot of ``tokens`` (prompt + max output), ``prefill_tokens`` of
        which are pending prefill until the first token; ``ttft_s``: its predicted time to first
        token from now, if any (`EndpointState.prefill_done_at`)."""
        rec = self.live[endpoint]
        now = self.clock()
        rec.inflight += 1
        rec.inflight_tokens += tokens
        rec.pending_prefill += 1
        rec.pending_prefill_tokens += prefill_tokens
        rec.pending_prefill_sq += prefill_tokens * prefill_tokens
        end = key = None
        if ttft_s is None:
            rec.prefill_unpredicted += 1
        else:
            end = now + max(0.0, ttft_s)
            key = next(self._prefill_keys)
            rec.prefill_ends[key] = end
        rec.requests_total += 1
        if rec.rate is not None:
            rec.rate.add(now, tokens)
        self._touch(rec, endpoint)
        if rec.waiters:
            _wake(rec)
        return Reservation(
            self, endpoint, tokens, prefill_tokens, record=rec, prefill_end=end, prefill_key=key
        )

    def _prefilled(
        self,
        endpoint: str,
        prefill_tokens: int,
        rec: EndpointLive | None = None,
        key: int | None = None,
    ) -> None:
        rec = rec or self.live[endpoint]
        rec.pending_prefill -= 1
        rec.pending_prefill_tokens -= prefill_tokens
        rec.pending_prefill_sq -= prefill_tokens * prefill_tokens
        if key is None:
            rec.prefill_unpredicted -= 1
        else:
            del rec.prefill_ends[key]  # this reservation's own entry, not one of equal value
        self._touch(rec, endpoint)
        if self.on_prefilled is not None:
            self.on_prefilled(endpoint)

    def _release(self, endpoint: str, tokens: int, rec: EndpointLive | None = None) -> None:
        rec = rec or self.live[endpoint]
        rec.inflight -= 1
        rec.inflight_tokens -= tokens
        self._touch(rec, endpoint)

    def is_healthy(self, endpoint: str) -> bool:
        """The endpoint's health verdict (its probes'); an unknown endpoint is not healthy."""
        rec = self.live.get(endpoint)
        return rec is not None and rec.healthy

    def served_since(self, endpoint: str, since: float, cleared: float | None = None) -> bool:
        """Whether an attempt on ``endpoint`` was served (a 2xx) after ``since`` (on this
        fleet's clock) and none failed after it, nor after ``cleared`` when that is later (a
        failure the caller knows was looked into since: a health probe that passed): it
        answered requests, which is what a health probe asks."""
        rec = self.live.get(endpoint)
        fails = since if cleared is None else max(since, cleared)
        return rec is not None and rec.last_ok_at > since and rec.last_fail_at <= fails

    def inflight_of(self, endpoint: str) -> int:
        """Requests this gateway has in flight on ``endpoint``, its sibling replicas' included
        (shared slots): what the engine's queue holds when no one else feeds it."""
        rec = self.live.get(endpoint)
        return 0 if rec is None else rec.all_inflight

    def set_remote_inflight(self, endpoint: str, n: int) -> None:
        """Other gateway processes' in-flight requests on the endpoint (from the shared slots);
        snapshots report ``inflight`` as this process's plus theirs."""
        rec = self.live.get(endpoint)
        if rec is not None and rec.remote_inflight != n:
            rec.remote_inflight = n
            self._touch(rec, endpoint)
            if rec.waiters and rec.all_inflight > 0:
                _wake(rec)

    def inflight_started(self, endpoint: str) -> asyncio.Future[None] | None:
        """A future that is done once ``endpoint`` has a request in flight from this gateway or,
        with shared slots, its sibling replicas (`inflight_of` above 0): at once if it has one
        now, else when the next one is reserved or the shared slots' sync reports one. Cancel
        it when no longer waiting (that drops it). None for an endpoint not in the fleet."""
        rec = self.live.get(endpoint)
        if rec is None:
            return None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if rec.all_inflight > 0:
            fut.set_result(None)
        else:
            rec.waiters.add(fut)
            fut.add_done_callback(rec.waiters.discard)
        return fut

    def observe_ttft(self, endpoint: str, seconds: float, predicted: float | None = None) -> None:
        """An observed TTFT, and (when placement predicted one) the ratio to its prediction."""
        rec = self._record_of(endpoint)
        rec.ttft.add(seconds)
        if predicted is not None and predicted > 0:
            rec.ttft_ratio.add(seconds / predicted)

    def observe_itl(self, endpoint: str, seconds: float) -> None:
        self._record_of(endpoint).itl.add(seconds)

    def observe_itls(self, endpoint: str, seconds: Iterable[float]) -> None:
        """A stream's inter-token gaps, in order (as many `observe_itl` calls)."""
        add = self._record_of(endpoint).itl.add
        for s in seconds:
            add(s)

    def observe_outcome(
        self, endpoint: str, ok: bool, *, timeout: bool = False, consecutive: bool = True,
        served: bool | None = None,
    ) -> None:
        """One attempt's outcome: into the error-rate window, and (unless ``consecutive`` is
        false: a 429, a client gone) the consecutive-failure counters — a success resets both;
        ``timeout`` marks a first-byte timeout. ``served`` (default: ``ok``): the endpoint
        answered it with a 2xx, which `served_since` counts as a passed health probe."""
        rec = self._record_of(endpoint)
        now = self.clock()
        rec.add_outcome(now, ok, self.error_half_life_s)
        if not consecutive:
            return
        if ok:
            if served is None or served:
                rec.last_ok_at = now
            rec.consecutive_failures = rec.consecutive_timeouts = 0
        else:
            rec.last_fail_at = now
            rec.consecutive_failures += 1
            if timeout:
                rec.consecutive_timeouts += 1

    # -- readers ---------------------------------------------------------------------------
    def power_now(self, endpoint: str) -> tuple[float | None, int]:
        """The endpoint's live power draw (None when unknown or stale) and its requests in
        flight: what `fleet.energy` needs when a request ends."""
        rec = self._record_of(endpoint)
        m = rec.metrics
        fresh = rec.metrics_at is not None and self.clock() - rec.metrics_at <= self.stale_after_s
        return (m.power_watts if m is not None and fresh else None), rec.inflight

    def state_of(self, endpoint: str, now: float) -> EndpointState:
        """The endpoint's state at ``now`` (latency percentiles at most ``refresh_s`` old)."""
        rec = self.live[endpoint]
        if now - rec.stats_at >= self.refresh_s:
            rec.refresh_stats(now, self.error_half_life_s)
        ttft50, ttft99, itl50, itl99, error_rate, ratio50 = rec.stats
        m = rec.metrics
        age = None if rec.metrics_at is None else now - rec.metrics_at
        requests_left = tokens_left = None
        if rec.rate is not None:
            requests_left, tokens_left = rec.rate.left(now)
        rec.dirty = False
        running = m.running if m else None
        waiting = m.waiting if m else None
        if rec.metrics_own:
            # the page held only the gateway's requests: no more of them than it has now
            inflight = rec.all_inflight
            if running is not None and running > inflight:
                running = float(inflight)
            if waiting is not None and running is not None and waiting > inflight - running:
                waiting = inflight - running
        return EndpointState(
            healthy=rec.healthy,
            ejected=rec.ejected,
            ejected_reason=rec.ejected_reason,
            stale=age is None or age > self.stale_after_s,
            metrics_at=rec.metrics_at,
            running=running,
            waiting=waiting,
            kv_usage=m.kv_usage if m else None,
            prefix_queries_total=m.prefix_queries_total if m else None,
            prefix_hits_total=m.prefix_hits_total if m else None,
            block_size=m.block_size if m else None,
            num_gpu_blocks=m.num_gpu_blocks if m else None,
            power_watts=m.power_watts if m else None,
            inflight=rec.all_inflight,
            inflight_tokens=rec.inflight_tokens,
            pending_prefill=rec.pending_prefill,
            pending_prefill_tokens=rec.pending_prefill_tokens,
            pending_prefill_sq=rec.pending_prefill_sq,
            prefill_done_at=(
                max(rec.prefill_ends.values())
                if rec.prefill_ends and not rec.prefill_unpredicted
                else None
            ),
            ttft_p50_s=ttft50,
            ttft_p99_s=ttft99,
            itl_p50_s=itl50,
            itl_p99_s=itl99,
            error_rate=error_rate,
            ttft_ratio_p50=ratio50,
            requests_total=rec.requests_total,
            requests_left=requests_left,
            tokens_left=tokens_left,
        )

    def _unchanged(self, view: EndpointView, now: float) -> bool:
        """Whether `state_of` at ``now`` would give ``view``'s state (the endpoint's in the
        current snapshot) again: nothing written since (not dirty), and what in it moves with
        the clock comes out the same — the latency percentiles and decayed error rate (refreshed
        here when due), the scraped page's staleness (the page's time is in the state, not its
        age), and the room left under declared rate limits in their rolling minute. A full
        refresh keeps such an endpoint's view: at 2,000 endpoints rebuilding every state took
        ~13 ms every ``refresh_s``, on the request that found it due."""
        rec = self.live[view.name]
        if rec.dirty:
            return False
        s = view.state
        if rec.metrics_at is not None and s.stale != (now - rec.metrics_at > self.stale_after_s):
            return False
        if rec.rate is not None and rec.rate.left(now) != (s.requests_left, s.tokens_left):
            return False
        if now - rec.stats_at >= self.refresh_s:
            before = rec.stats
            rec.refresh_stats(now, self.error_half_life_s)
            return rec.stats == before
        return True

    def snapshot(self) -> FleetSnapshot:
        """The current immutable snapshot.

        Cached while nothing changed. After a change only the endpoints that changed get a new
        state (a reservation touches one endpoint), found from the list of those written to
        (``_touched``), not by a walk over every view; every ``refresh_s`` all are re-evaluated
        (staleness, the latency percentiles, the decayed error rate, rate-limit room), and those
        whose state would come out the same keep their view (`_unchanged`: a scraped endpoint's
        too, its page's time being in the state).
        """
        now = self.clock()
        snap = self._snapshot
        full = snap is None or now - self._snapshot_at >= self.refresh_s
        if snap is not None and not full and snap.version == self._version:
            return snap
        replaced: tuple[int, ...] | None
        if snap is None or snap.fleet is not self.fleet:
            views = tuple(EndpointView(e, self.state_of(e.name, now)) for e in self.fleet.endpoints)
            self._positions = {e.name: i for i, e in enumerate(self.fleet.endpoints)}
            self._snapshot_at = now
            replaced = None
        elif full:
            new = list(snap.endpoints)
            at: list[int] = []
            for i, v in enumerate(new):
                if not self._unchanged(v, now):
                    new[i] = EndpointView(v.endpoint, self.state_of(v.name, now))
                    at.append(i)
            views, replaced = tuple(new), tuple(at)
            self._snapshot_at = now
        else:
            # only the endpoints written to since the last snapshot (a request's reservation,
            # first token and release: one each), not a walk over every view
            new = list(snap.endpoints)
            at = []
            positions = self._positions
            for name in self._touched:
                p = positions.get(name)  # None: not in the fleet (a removed endpoint's record)
                if p is not None and self.live[name].dirty:
                    v = new[p]
                    new[p] = EndpointView(v.endpoint, self.state_of(name, now))
                    at.append(p)
            views, replaced = tuple(new), tuple(at)
        self._touched.clear()
        self._serial += 1
        self._log.add(self._serial, replaced)
        snap = FleetSnapshot(
            fleet=self.fleet,
            endpoints=views,
            now=now,
            version=self._version,
            prefix_index=self.prefix_index,
            serial=self._serial,
            log=self._log,
        )
        self._snapshot = snap
        return snap
