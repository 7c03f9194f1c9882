"""Scrape each endpoint's ``/metrics`` and probe its health, feeding `LiveFleet`.

Each endpoint's health strategy (`Endpoint.health_check`) picks the probe: ``GET /health``,
``GET /v1/models`` (with the endpoint's credentials: a hosted API answers 404 on ``/health``), or
none (``passive``: the endpoint stays healthy and only the gateway's own outcomes eject it).
Endpoints that do not expose engine metrics (`Endpoint.scrape_metrics` false, the default for
provider APIs) are not scraped.

The I/O sits behind `MetricsSource`, one small interface: `HttpMetricsSource` talks HTTP with a
shared aiohttp session; tests use `StaticMetricsSource` (in-memory, like httpx's MockTransport).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Literal, Protocol
from urllib.parse import urlencode

import aiohttp

from inferplane.config.schema import SKIP_WINDOW_MAX_S
from inferplane.fleet.engine_metrics import parse_metrics, sample_names, sample_names_on
from inferplane.fleet.live import LiveFleet
from inferplane.fleet.model import Endpoint
from inferplane.looplag import MAX_STRETCH, LoopLag, bounded

log = logging.getLogger("inferplane.scraper")

Quiet = Literal["idle", "own"] | None
"""What a page showed for the scrape back-off (`Scraper`): an idle engine, a busy one holding
only this gateway's requests, or neither."""

# scrapes ask for no compressed page (the gateway's session does not decode one)
_IDENTITY = {"Accept-Encoding": "identity"}


class MetricsSource(Protocol):
    async def metrics(self, endpoint: Endpoint) -> str | None:
        """The endpoint's Prometheus text, or None when it could not be read."""

    async def healthy(self, endpoint: Endpoint) -> bool:
        """Whether the endpoint's health probe answered 2xx."""


def _unanswered(source: MetricsSource, endpoint: Endpoint) -> bool:
    """Whether ``source``'s last `MetricsSource.metrics` of ``endpoint``, which read no page,
    got no answer at all (refused, reset, timed out), as opposed to an answer that is not a
    page (a non-200: the server answered). A source that cannot tell (no ``unanswered``
    method, as `StaticMetricsSource`) counts every page it did not read as unanswered."""
    unanswered: Callable[[Endpoint], bool] | None = getattr(source, "unanswered", None)
    return True if unanswered is None else unanswered(endpoint)


AuthHeaders = Callable[[Endpoint], Mapping[str, str]]


class HttpMetricsSource:
    """Reads ``/metrics`` and probes health over HTTP. ``auth`` gives the headers that carry an
    endpoint's credentials (used by the ``models`` probe).

    Each call is bounded by ``timeout_s`` of the gateway's running time when ``lag`` is given
    (`inferplane.looplag`: a probe is not failed because the gateway itself was descheduled),
    and by ``max_stretch × timeout_s`` of wall time in any case (``gateway.lag_max_stretch``:
    a loop that is merely busy looks late too, and an endpoint that does not answer must still
    fail its probe under load).

    **Only the samples the parser reads** (``filter_samples``, ``gateway.scrape_filter``). A
    vLLM engine renders its whole page (~50 KB, every histogram bucket) for each scrape in the
    process that answers its requests; prometheus_client, which renders it, serves only the
    samples named by ``name[]`` query parameters. vLLM 0.32 answers ``/metrics`` itself from
    prometheus-fastapi-instrumentator's route (in a worker thread), which renders everything
    whatever the query, and mounts prometheus_client's app under ``/metrics/`` (rendered on its
    event loop, but a fraction of the page): so an engine kind with
    `engine_metrics.sample_names` is asked ``/metrics/?name[]=…``, once its path is decided.

    *The decision* (`_decide`) reads both pages and takes the filtered one when it answered 200
    and parses every field the whole page's parse fills (a sample a node agent merges into
    ``/metrics`` only, such as DCGM power, keeps the endpoint on the whole page), its query then
    narrowed to the names the whole page carries (`narrowed_path`: a vLLM 0.32 page lacks 7 of
    the 20, older engines' aliases and DCGM power; each ``name[]`` is parsed and logged by the
    engine on every scrape, ~850 bytes of query for all 20, ~560 for 0.32's 13); the whole one
    when the filtered path is absent (a 3xx or a 4xx other than 408/429) or falls short, and the
    whole page answered 200. Anything else (not answered, a 5xx, 408, 429) decides nothing:
    that scrape returns the whole page as read. A decision is logged, and made again after
    `RECHECK_S` (an engine replaced behind the same URL), or at once when the filtered page
    stops answering 200 or carrying the kind's first sample (its running-requests gauge). vLLM
    with several API servers (``--api-server-count``, data parallelism) renders from
    prometheus_client's multiprocess collector, which cannot filter: its filtered page is empty
    and it is read whole. Every scrape asks for ``Accept-Encoding: identity`` (prometheus_client
    would otherwise gzip the page on the engine's loop)."""

    WHOLE = "/metrics"
    RECHECK_S = 300.0
    """How long a decision of an endpoint's path holds."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        timeout_s: float = 1.0,
        auth: AuthHeaders | None = None,
        lag: LoopLag | None = None,
        max_stretch: float = MAX_STRETCH,
        filter_samples: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session = session
        self.timeout_s = timeout_s
        self.lag = lag
        self.max_stretch = max(1.0, max_stretch)
        # aiohttp's own limit only backs the deadline up: it is the deadline's wall-time cap
        self.timeout = aiohttp.ClientTimeout(
            total=timeout_s * (self.max_stretch if lag else 1.0)
        )
        self.auth = auth
        self.filter_samples = filter_samples
        self.clock = clock
        self._paths: dict[str, tuple[str, float]] = {}  # endpoint URL -> (path, decided at)
        self._filtered: dict[str, tuple[str, str] | None] = {}  # engine -> (path, marker)
        self._reached: dict[str, bool] = {}  # endpoint URL -> whether its last GET was answered
        # (what, endpoint) -> (since, reason) while its probe or scrape fails (`_went`)
        self._failing: dict[tuple[str, str], tuple[float, str]] = {}

    def _went(self, what: str, endpoint: Endpoint, reason: str | None) -> None:
        """Log a change of the endpoint's probe (or scrape) between answering and not: one
        WARNING when it starts failing, with why (connection refused, timed out, HTTP 503), and
        one when it answers again, never one per failed try."""
        key = (what, endpoint.name)
        was = self._failing.get(key)
        if reason is None:
            if was is not None:
                del self._failing[key]
                log.warning("%s of %s answers again after %.1f s", what, endpoint.name,
                            self.clock() - was[0])
        elif was is None:
            self._failing[key] = (self.clock(), reason)
            log.warning("%s of %s failed: %s (logged again only when it answers)", what,
                        endpoint.name, reason)

    def _deadline(self) -> contextlib.AbstractAsyncContextManager[object]:
        if self.lag is None:
            return contextlib.nullcontext()
        return bounded(self.lag, self.timeout_s, self.max_stretch)

    def filtered_path(self, engine: str) -> tuple[str, str] | None:
        """(the filtered page's path and query, the sample it must carry) for an ``engine``
        kind, None when its page is read whole."""
        if engine not in self._filtered:
            names = sample_names(engine) if self.filter_samples else None
            self._filtered[engine] = None if not names else (
                "/metrics/?" + urlencode([("name[]", n) for n in names]), names[0])
        return self._filtered[engine]

    @staticmethod
    def narrowed_path(engine: str, whole: str) -> str | None:
        """The filtered page's path and query asking only for the names the ``whole`` page
        carries (`engine_metrics.sample_names_on`), None for a kind whose page is read whole."""
        names = sample_names_on(engine, whole)
        return None if not names else "/metrics/?" + urlencode([("name[]", n) for n in names])

    def path_of(self, endpoint: Endpoint) -> str | None:
        """The path an endpoint's scrapes read now (None: not decided yet)."""
        decided = self._paths.get(endpoint.url)
        return None if decided is None else decided[0]

    async def _get(self, endpoint: Endpoint, path: str) -> tuple[int | None, str | None]:
        """(status, text): (None, None) when it could not be read (timeout, connection). The
        filtered path is not redirected (a server without it that redirects ``/metrics/`` to
        ``/metrics`` would cost two requests a scrape): its redirect is a status like any."""
        url = endpoint.url
        self._reached[url] = False
        try:
            async with self._deadline(), self.session.get(
                f"{url}{path}", timeout=self.timeout, headers=_IDENTITY,
                allow_redirects=path == self.WHOLE,
            ) as r:
                if r.status != 200:
                    self._reached[url] = True  # a status is an answer
                    return r.status, None
                # answered only once the page is read: a timeout or a reset in the body is not
                try:
                    text = await r.text()
                except UnicodeDecodeError:
                    self._reached[url] = True  # read, but it would not decode
                    return None, None
                self._reached[url] = True
                self._went("metrics scrape", endpoint, None)
                return 200, text
        except (TimeoutError, aiohttp.ClientError) as exc:
            self._went("metrics scrape", endpoint, _why(exc, self.timeout_s))
            return None, None

    def unanswered(self, endpoint: Endpoint) -> bool:
        """Whether the last request for the endpoint's page got no answer at all (refused,
        reset, timed out, before or while the page was read): not a non-200 status nor a
        page that would not decode, which the server answered. The scraper's failed scrape
        (`Scraper`'s serving skip)."""
        return not self._reached.get(endpoint.url, False)

    def forget(self, kept: Collection[str]) -> None:
        """Drop the answered records (`unanswered`) of endpoint URLs not in ``kept``: the
        reloaded fleet's (`Scraper.reconfigure`)."""
        for url in self._reached.keys() - set(kept):
            del self._reached[url]

    async def metrics(self, endpoint: Endpoint) -> str | None:
        filtered = self.filtered_path(endpoint.spec.engine)
        if filtered is None:
            return (await self._get(endpoint, self.WHOLE))[1]
        decided = self._paths.get(endpoint.url)
        if decided is not None and self.clock() - decided[1] < self.RECHECK_S:
            status, text = await self._get(endpoint, decided[0])
            if decided[0] == self.WHOLE or status is None:
                return text
            if text is not None and filtered[1] in text:
                return text
            # the filtered page stopped answering 200 or carrying the gauge: decide again
        return await self._decide(endpoint, filtered)

    async def _decide(self, endpoint: Endpoint, filtered: tuple[str, str]) -> str | None:
        """Read both pages, decide the endpoint's path (the class docstring) and return the
        whole page (or the filtered one when only it was read)."""
        url, engine = endpoint.url, endpoint.spec.engine
        f_status, f_text = await self._get(endpoint, filtered[0])
        _, w_text = await self._get(endpoint, self.WHOLE)
        if w_text is None:
            return f_text if f_text is not None and filtered[1] in f_text else None
        short: list[str] = []
        if f_text is not None:
            got = parse_metrics(engine, f_text)
            whole = parse_metrics(engine, w_text)
            short = [f.name for f in fields(whole) if getattr(whole, f.name) is not None
                     and getattr(got, f.name) is None]
            if not short:
                path = self.narrowed_path(engine, w_text) or filtered[0]
                if self._paths.get(url, ("",))[0] != path:
                    log.info("%s: scraping the filtered /metrics/ page (%d bytes instead of %d; "
                             "%d of the %d names the parser reads are on it)", endpoint.name,
                             len(f_text), len(w_text), path.count("name"),
                             filtered[0].count("name"))
                self._paths[url] = (path, self.clock())
                return w_text
        elif f_status is None or f_status >= 500 or f_status in (408, 429):
            return w_text  # the filtered path did not answer for now: nothing decided
        if self._paths.get(url, ("",))[0] != self.WHOLE:
            log.info("%s: scraping the whole /metrics page (the filtered /metrics/ %s)",
                     endpoint.name, f"answered {f_status}" if f_text is None
                     else "lacks " + ", ".join(short))
        self._paths[url] = (self.WHOLE, self.clock())
        return w_text

    async def healthy(self, endpoint: Endpoint) -> bool:
        if endpoint.health_check == "passive":
            return True
        if endpoint.health_check == "models":
            url = endpoint.api_url("/v1/models")
            headers = dict(self.auth(endpoint)) if self.auth is not None else {}
        else:
            url, headers = f"{endpoint.url}/health", {}
        try:
            async with (
                self._deadline(),
                self.session.get(url, headers=headers, timeout=self.timeout) as r,
            ):
                await r.read()
                ok = 200 <= r.status < 300
                self._went("health probe", endpoint, None if ok else f"answered HTTP {r.status}")
                return ok
        except (TimeoutError, aiohttp.ClientError) as exc:
            self._went("health probe", endpoint, _why(exc, self.timeout_s))
            return False


def _why(exc: BaseException, timeout_s: float) -> str:
    """Why a probe or a scrape got no answer, in words."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    return f"connection failed ({type(exc).__name__}: {exc})"


class StaticMetricsSource:
    """In-memory source for tests: set ``texts[name]`` / ``health[name]``."""

    def __init__(self) -> None:
        self.texts: dict[str, str | None] = {}
        self.health: dict[str, bool] = {}

    async def metrics(self, endpoint: Endpoint) -> str | None:
        return self.texts.get(endpoint.name)

    async def healthy(self, endpoint: Endpoint) -> bool:
        return self.health.get(endpoint.name, True)


def idle_wait_cap(quiet_s: float | None, stale_after_s: float,
                  stale_eject_s: float | None = None) -> float | None:
    """The idle back-off's longest wait (`Scraper`): ``quiet_s`` cut to half of ``stale_after_s``
    and of ``stale_eject_s`` (when set), so that an idle endpoint's metrics never read as stale,
    nor get it ejected as stale, between two of its scrapes; None (off) stays None."""
    if quiet_s is None:
        return None
    cap = min(quiet_s, stale_after_s / 2)
    return cap if stale_eject_s is None else min(cap, stale_eject_s / 2)


SKIP_TURNS = 3
"""The skip's window in probe periods when ``gateway.health_skip_window_s`` is unset."""


def skip_window(window_s: float | None, health_interval_s: float) -> float:
    """The serving skip's configured window (`Scraper`, ``gateway.health_skip_window_s``):
    ``window_s`` seconds as given, or when None `SKIP_TURNS` × ``health_interval_s`` capped at
    ``max(SKIP_WINDOW_MAX_S, health_interval_s)`` (the bound a number has; one interval when
    that is longer). The window in effect, at least ``health_interval_s`` (the skip reaches
    back at least to the previous turn), is the callers' (`Scraper.skip_since`)."""
    if window_s is not None:
        return window_s
    return min(SKIP_TURNS * health_interval_s, max(SKIP_WINDOW_MAX_S, health_interval_s))


def serving_vouches(
    live: LiveFleet, name: str, since: float, *, vouched: float, scrape_failed: float,
    window_s: float, interval_s: float,
) -> bool:
    """The serving skip's test (`Scraper.may_skip`; the simulator's `_probe_down` too): whether
    ``name``'s answers vouch for it at a probe turn whose window starts at ``since``, the last
    passed probe's turn being ``vouched`` and its last failed scrape ``scrape_failed``
    (``-inf``: none), with the configured window ``window_s`` (`skip_window`) and the probe
    period ``interval_s``. A window no longer than the period tests the previous turn alone, as
    before the window existed: a 2xx answer after ``since`` and no failed request after it.
    A longer one: a failed scrape since the last passed probe doubts the answers before it, as
    a failed probe does, so only an answer after it vouches; failures count from ``since`` or
    the passed probe, whichever is later."""
    if window_s <= interval_s:
        return live.served_since(name, since)
    cleared = max(since, vouched)
    answered = max(since, scrape_failed) if scrape_failed > vouched else since
    return live.served_since(name, since, cleared) and live.served_since(name, answered, cleared)


class Scraper:
    """Runs one scrape loop and one health loop per endpoint until `stop`.

    A health verdict flips to unhealthy after ``failures_to_down`` consecutive failed probes and
    back after one success. Metrics that stop arriving simply age into staleness.

    **Paced scrapes.** An engine renders its ``/metrics`` page on the same process (vLLM: the
    API server's event loop) that answers requests: a page of ~50 KB for vLLM, and on a loaded
    host many times longer in wall time than on an idle one, during which no request is answered.
    With ``max_duty``, after a scrape that took ``t`` seconds the loop waits
    `pause_s` = ``max(interval_s, t × (1/max_duty − 1))``, at most
    ``max(interval_s, max_interval_s)``: an endpoint spends at most ``max_duty`` of its time
    answering this gateway's scrapes (unless that would leave it unscraped for longer than
    ``max_interval_s``). A fast engine is still scraped every ``interval_s``. ``t`` is the HTTP
    fetch alone (request to the last byte of the page, answered or not), not the parse of the
    page; with ``lag`` (`inferplane.looplag`) it is the gateway's running time, so a busy or
    descheduled gateway does not count its own lateness as the engine's.

    **Idle engines are scraped less** (``quiet_interval_s``,
    ``gateway.scrape_quiet_interval_s``; `idle_wait_cap` bounds it). An engine whose page reports
    no request running or waiting, while this gateway has none in flight there (its own and, with
    shared slots, its sibling replicas', at the fetch's start and at its end), is idle: its queue
    does not change until someone sends it a request. While that holds, each wait doubles, from
    the paced one up to ``quiet_interval_s`` (one sleep, timed on ``clock``: a late wake-up
    shortens it, never lengthens it), and — without ``quiet_busy``, below — is cut short as
    soon as the gateway has a request in flight there (its own from the moment it is reserved;
    with shared slots, its sibling replicas' when the slots' sync reports them,
    `LiveFleet.inflight_started`): an engine the gateway starts feeding is scraped at once and
    at the paced rate from then on, so under load nothing is staler than before.
    The first page that shows a request (the gateway's or anyone's), an unreadable page or one
    without the running and waiting gauges puts the loop back on the paced wait. What idle back-
    off gives up: another client's traffic to an idle engine is seen up to ``quiet_interval_s``
    late, and later on an engine whose gauges lag its queue (SGLang updates its running and
    queued counts only at some scheduler steps).

    **So are busy engines that hold only this gateway's requests** (``quiet_busy``,
    ``gateway.scrape_quiet_busy``). A page whose running + waiting is no more than the requests
    this gateway (with its replicas sharing slots) had in flight there, at the fetch's start or
    at its end, tells nothing the gateway did not know: its queue is the gateway's own, which
    the gateway counts itself. Such an *own* page (an idle one too) is stored marked so
    (`LiveFleet.update_metrics`: its running and waiting are then read no higher than the
    gateway's count at the time they are read, so an old page does not outlive the requests it
    showed), and the wait doubles as for an idle engine, up to ``quiet_interval_s``; no wait,
    idle or busy, is then cut short by the gateway's requests: they are what the next page is
    expected to show. A page showing more than the gateway's count (another client's requests)
    goes back to the paced wait. On a fleet that only this gateway feeds that is one scrape per
    ``quiet_interval_s`` per engine, under load and between bursts alike, instead of one per
    paced wait while busy and one at the start of each burst, each of which costs a vLLM API
    server a page render on the loop that serves its requests. What it gives up: another
    client's traffic is seen up to ``quiet_interval_s`` late, and not at all while it is hidden
    by the gateway's own requests still on their way to the engine (counted by the gateway, not
    yet on the page); the KV cache usage and the engine's counters are refreshed as rarely.

    **Probes of a serving endpoint are skipped** (``skip_probe_while_serving``,
    ``gateway.health_skip_while_serving``): each ``health_interval_s``, a healthy endpoint that
    has answered a request of the gateway with a 2xx within the skip's window, and failed none
    in it, is not probed: the answer showed what the probe asks (`LiveFleet.served_since`), and
    it counts as a passed probe. The window (`skip_since`) reaches back to the start of the
    previous turn, or ``skip_window_s`` (``gateway.health_skip_window_s``; None:
    `SKIP_TURNS` × ``health_interval_s``, at most ``max(60 s, health_interval_s)``,
    `skip_window`) when that is longer, and never before the turn of a failed probe: an answer
    older than a failed probe skips nothing. Any failure in the window (a consecutive-counting
    one: not a 429 nor a client gone) forces the probe, even with answers after it, until a
    probe passes: a failure before the turn of a passed probe no longer counts. With a window
    longer than ``health_interval_s`` a failed ``/metrics`` scrape since the last passed probe
    counts as a failed probe's turn does: answers before it skip nothing, answers after it
    still skip (a failed scrape is one that got no answer: refused, reset, timed out; not a
    non-200 status, which the server answered, nor a scrape left out, nor an endpoint that is
    not scraped). The scrape loop reaches an engine at least every ``quiet_interval_s`` (1 s
    by default), busy or idle, so an engine that dies right after answering, with no request
    after, is probed at the first turn after its next scrape; a loaded engine whose scrape
    times out while it keeps answering is not probed for it. An endpoint without such
    traffic (idle), with a failure in the window, or marked unhealthy is probed every
    ``health_interval_s`` as before. A window no longer than ``health_interval_s`` skips
    exactly as the previous turn alone did before the window existed. The window decouples
    the skip from the probe period: at under one request per second per engine, a one-second
    window often holds no answer, and each probe costs a vLLM API server a request on the loop
    that serves tokens. What it gives up: an engine that dies right after answering, with no
    request of the gateway there after and no failed scrape (one not scraped), is probed up
    to the window (at least one ``health_interval_s``) later than without the skip; its
    failing requests, counted by passive health and the outlier detector, do not wait for the
    probe, and each forces the next turn's probe.
    """

    def __init__(
        self,
        live: LiveFleet,
        source: MetricsSource,
        *,
        interval_s: float = 0.1,
        health_interval_s: float = 1.0,
        failures_to_down: int = 2,
        max_duty: float | None = None,
        max_interval_s: float = 0.5,
        quiet_interval_s: float | None = None,
        quiet_busy: bool = False,
        skip_probe_while_serving: bool = False,
        skip_window_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        lag: LoopLag | None = None,
    ) -> None:
        self.live = live
        self.quiet_interval_s = quiet_interval_s
        self.quiet_busy = quiet_busy
        self.skip_probe_while_serving = skip_probe_while_serving
        self.skip_window_s = skip_window(skip_window_s, health_interval_s)
        self.source = source
        self.interval_s = interval_s
        self.max_duty = max_duty
        self.max_interval_s = max(interval_s, max_interval_s)
        self.clock = clock
        self.lag = lag
        self.health_interval_s = health_interval_s
        self.failures_to_down = failures_to_down
        self._tasks: dict[str, tuple[Endpoint, list[asyncio.Task[None]]]] = {}
        # requests this scraper made of the endpoints since start, answered or not (what it
        # asks of the engines besides the requests it routes: inferplane_engine_scrapes_total,
        # inferplane_health_probes_total)
        self.scrapes = 0
        self.probes = 0
        # endpoint -> when (on the live fleet's clock) its last scrape got no answer: answers
        # before it skip no probe (the class docstring)
        self.scrape_failed_at: dict[str, float] = {}

    async def scrape_once(self, endpoint: Endpoint) -> bool:
        return (await self._scrape(endpoint))[0]

    async def _scrape(self, endpoint: Endpoint) -> tuple[bool, float, Quiet]:
        """(metrics updated, seconds the fetch took: the class docstring's ``t``, what the page
        showed for the back-off: ``"idle"``, ``"own"`` (busy with the gateway's own requests
        only) or None (the paced wait))."""
        if not endpoint.scrape_metrics:
            return False, 0.0, None
        lag = self.lag if self.lag is not None and self.lag.running else None
        mark = lag.mark() if lag is not None else (0.0, 0.0)
        before = self.live.inflight_of(endpoint.name)
        started = self.clock()
        self.scrapes += 1
        text = await self.source.metrics(endpoint)
        took = self.clock() - started if lag is None else lag.ran_s(mark)
        if text is None:
            if _unanswered(self.source, endpoint):  # not a non-200: the server answered that
                self.scrape_failed_at[endpoint.name] = self.live.clock()
            return False, took, None
        metrics = parse_metrics(endpoint.spec.engine, text)
        after = self.live.inflight_of(endpoint.name)
        quiet: Quiet = None
        if metrics.running is not None and metrics.waiting is not None:
            work = metrics.running + metrics.waiting
            if work == 0 and before == 0 and after == 0:
                quiet = "idle"
            elif work <= max(before, after):  # the gateway had some in flight: its own
                quiet = "own"
        if quiet == "own" and not self.quiet_busy:
            quiet = None
        self.live.update_metrics(endpoint.name, metrics, own=self.quiet_busy and quiet is not None)
        return True, took, quiet

    async def probe_once(self, endpoint: Endpoint, failures: int) -> int:
        self.probes += 1
        ok = await self.source.healthy(endpoint)
        failures = 0 if ok else failures + 1
        if ok:
            self.live.set_health(endpoint.name, True)
        elif failures >= self.failures_to_down:
            self.live.set_health(endpoint.name, False)
        return failures

    def pause_s(self, took_s: float) -> float:
        """The wait after a scrape that took ``took_s`` seconds (the class docstring)."""
        if self.max_duty is None:
            return self.interval_s
        paced = took_s * (1.0 / self.max_duty - 1.0)
        if paced <= self.interval_s:
            return self.interval_s
        return min(paced, self.max_interval_s)

    def quiet_pause_s(self, paced_s: float, quiet: int) -> float:
        """The wait after the ``quiet``-th scrape in a row that found the engine idle (0: the
        last one did not), given the paced wait ``paced_s``: doubled per idle scrape, at most
        ``quiet_interval_s`` (the class docstring's idle back-off)."""
        if quiet <= 0 or self.quiet_interval_s is None or paced_s >= self.quiet_interval_s:
            return paced_s
        return min(self.quiet_interval_s, paced_s * 2.0 ** min(quiet, 32))

    async def _scrape_loop(self, endpoint: Endpoint) -> None:
        quiet = 0
        while True:
            took = 0.0
            kind: Quiet = None
            try:
                _, took, kind = await self._scrape(endpoint)
            except Exception:  # a parser bug must not kill the loop
                log.exception("scrape of %s failed", endpoint.name)
            quiet = quiet + 1 if kind is not None else 0
            paced = self.pause_s(took)
            pause = self.quiet_pause_s(paced, quiet)
            if pause <= paced:
                await asyncio.sleep(pause)
                continue
            # back-off: one sleep to the deadline (by the clock: a late wake-up shortens what is
            # left, never lengthens the wait; another sleep only if the clock says it woke
            # early); an idle engine is scraped as soon as the gateway has a request in flight
            # there, unless quiet_busy expects its page to show just that
            deadline = self.clock() + pause
            while True:
                left = deadline - self.clock()
                if left <= 1e-9:
                    break
                if self.quiet_busy:
                    await asyncio.sleep(left)
                elif await self._until_inflight(endpoint, left):
                    break

    async def _until_inflight(self, endpoint: Endpoint, seconds: float) -> bool:
        """Sleep ``seconds``, or less if the gateway (with its replicas sharing slots) has a
        request in flight on ``endpoint`` before: then True (at once if it has one now)."""
        started = self.live.inflight_started(endpoint.name)
        if started is None:  # not in the fleet (any more): nothing to wait for
            await asyncio.sleep(seconds)
            return False
        if started.done():
            return True
        sleep = asyncio.ensure_future(asyncio.sleep(seconds))
        try:
            await asyncio.wait((started, sleep), return_when=asyncio.FIRST_COMPLETED)
            if started.done():
                return True
            sleep.result()  # what the sleep raised, if anything, is the loop's
            return False
        finally:
            sleep.cancel()
            started.cancel()

    def skip_since(self, turn: float, previous: float, doubted: float) -> float:
        """Where the skip's window starts for a probe turn that starts at ``turn`` (on the live
        fleet's clock), after one that started at ``previous`` (``-inf``: none yet) and after
        the last failed probe's turn ``doubted`` (``-inf``: none): an answer after it, and no
        failure, skips the probe (`LiveFleet.served_since`). The previous turn, or
        ``skip_window_s`` back when that is longer (the class docstring); never before the
        last failed probe."""
        since = previous
        if self.skip_window_s > self.health_interval_s:
            since = min(since, turn - self.skip_window_s)
        return max(since, doubted)

    def may_skip(self, name: str, since: float, vouched: float) -> bool:
        """Whether the probe of the healthy endpoint ``name`` is skipped at a turn whose
        window starts at ``since`` (`skip_since`), the last passed probe's turn being
        ``vouched`` (``-inf``: none): a 2xx answer after ``since`` and after a failed scrape
        later than ``vouched``, and no failed request after ``since`` and after ``vouched``.
        A window no longer than ``health_interval_s`` skips as the previous turn alone did
        before the window existed: a failed scrape counts for nothing there (a passed probe's
        turn is never after ``since`` there)."""
        return serving_vouches(
            self.live, name, since, vouched=vouched,
            scrape_failed=self.scrape_failed_at.get(name, float("-inf")),
            window_s=self.skip_window_s, interval_s=self.health_interval_s,
        )

    async def _health_loop(self, endpoint: Endpoint) -> None:
        failures = 0
        previous = doubted = vouched = float("-inf")
        while True:
            turn = self.live.clock()  # outcomes from here on count for the next turn
            if (self.skip_probe_while_serving and self.live.is_healthy(endpoint.name)
                    and self.may_skip(endpoint.name, self.skip_since(turn, previous, doubted),
                                      vouched)):
                failures = 0  # the answer passed for the probe
            else:
                failures = await self.probe_once(endpoint, failures)
                if failures:
                    doubted = turn  # answers before a failed probe no longer skip one
                else:
                    vouched = turn  # nor do failures before a passed one force one
            previous = turn
            await asyncio.sleep(self.health_interval_s)

    async def prime(self) -> None:
        """One scrape and probe of every endpoint, concurrently (start-up)."""
        eps = self.live.fleet.endpoints
        await asyncio.gather(*(self.scrape_once(e) for e in eps))
        probed = [e for e in eps if e.health_check != "passive"]
        self.probes += len(probed)
        results = await asyncio.gather(*(self.source.healthy(e) for e in probed))
        for e, ok in zip(probed, results, strict=True):
            self.live.set_health(e.name, ok)

    async def observe(self, endpoints: Sequence[Endpoint]) -> list[Observation]:
        """One scrape and probe of each endpoint, concurrently, without writing anything:
        a reload observes its new endpoints before they join the fleet (`apply`)."""

        async def one(e: Endpoint) -> Observation:
            text = await self.source.metrics(e) if e.scrape_metrics else None
            ok = await self.source.healthy(e) if e.health_check != "passive" else None
            return Observation(e, text, ok)

        return list(await asyncio.gather(*(one(e) for e in endpoints)))

    def apply(self, observations: Sequence[Observation]) -> None:
        """Write what `observe` read into the live fleet (as `prime` does at start-up)."""
        for o in observations:
            if o.text is not None:
                try:
                    metrics = parse_metrics(o.endpoint.spec.engine, o.text)
                except Exception:  # a parser bug must not fail the reload
                    log.exception("scrape of %s failed", o.endpoint.name)
                else:
                    self.live.update_metrics(o.endpoint.name, metrics)
            if o.healthy is not None:
                self.live.set_health(o.endpoint.name, o.healthy)

    def _watch(self, e: Endpoint) -> None:
        tasks = []
        if e.scrape_metrics:
            tasks.append(asyncio.create_task(self._scrape_loop(e)))
        if e.health_check != "passive":
            tasks.append(asyncio.create_task(self._health_loop(e)))
        self._tasks[e.name] = (e, tasks)

    def start(self) -> None:
        for e in self.live.fleet.endpoints:
            self._watch(e)

    def reconfigure(self, fresh: Sequence[str] = ()) -> None:
        """Follow the live fleet after a reload: loops of removed endpoints, and of endpoints
        whose definition changed (or are ``fresh``), are cancelled; new ones start."""
        by_name = self.live.fleet.by_name
        renewed = set(fresh)
        for name, (old, tasks) in list(self._tasks.items()):
            new = by_name.get(name)
            if new is None or name in renewed or not new.same_definition(old):
                for t in tasks:
                    t.cancel()
                del self._tasks[name]
                self.scrape_failed_at.pop(name, None)
        for e in self.live.fleet.endpoints:
            if e.name not in self._tasks:
                self._watch(e)
        forget: Callable[[Collection[str]], None] | None = getattr(self.source, "forget", None)
        if forget is not None:  # the source's records of URLs no endpoint has now
            forget({e.url for e in self.live.fleet.endpoints})

    async def stop(self) -> None:
        tasks = [t for _, ts in self._tasks.values() for t in ts]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()


@dataclass(frozen=True, slots=True)
class Observation:
    """What one scrape and probe of an endpoint read (`Scraper.observe`): the metrics text
    (None: not scraped or unreadable) and the probe's verdict (None: passive, no probe)."""

    endpoint: Endpoint
    text: str | None
    healthy: bool | None
