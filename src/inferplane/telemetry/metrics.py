"""The gateway's own Prometheus metrics, in one registry per gateway (no global state).

Label sets are bounded: endpoint and substrate names come from config, tenant names only when
``gateway.metrics.tenant_labels`` is on (else one value, ``all``), ``code`` from a fixed set of
HTTP statuses, plugin names from config. A fleet reload that removes an endpoint or a substrate
removes its series too (`forget`; a removed endpoint's once its requests in flight drained).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from inferplane import __version__, compiled
from inferplane.telemetry import schedstat

log = logging.getLogger("inferplane.telemetry.metrics")

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_PLUGIN_BUCKETS = (1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3)


RESPONSE_API_LABELS = frozenset({"chat", "completions", "embeddings", "models", "files",
                                 "batches", "decisions", "usage", "admin", "other"})
"""The closed set of ``inferplane_responses_total``'s ``api`` label (its help names them)."""
# a counter in no registry, collected only to see whether prometheus_client exports _created
_CREATED_PROBE = Counter("inferplane_created_probe", "", registry=None)


def created_series() -> bool:
    """Whether counters export ``_created`` as prometheus_client's own do: yes unless
    ``PROMETHEUS_DISABLE_CREATED_SERIES`` is set or `prometheus_client.disable_created_metrics`
    was called. The library has no public getter for its switch, so this asks one of its own
    counters (collected now: it follows a switch turned at run time)."""
    return any(s.name.endswith("_created")
               for family in _CREATED_PROBE.collect() for s in family.samples)


class WithoutCreated(Collector):
    """A registry's families with no ``_created`` samples, whatever prometheus_client's switch
    says: what the gateway's and the picker's pages render (`page`). In the text format those
    samples are gauges of their own, one series per labelled counter, histogram or summary
    child, that nothing here reads (Prometheus ingests them as ordinary series; rates and
    resets come from the counters): 51 on the quickstart's page, and one per endpoint and
    per-endpoint counter or histogram once traffic reached it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            if family.type in ("counter", "histogram", "summary"):
                created = family.name + "_created"
                family.samples = [s for s in family.samples if s.name != created]
            yield family


def page(registry: CollectorRegistry) -> bytes:
    """``registry`` in Prometheus's text format, without ``_created`` samples
    (`WithoutCreated`)."""
    return generate_latest(WithoutCreated(registry))


class SourcedCounter:
    """A counter whose total is a plain number kept by the code that counts (an int bumped on
    the request path, where a prometheus_client `Counter`'s ``inc`` would take a lock), read
    each time the registry is collected (`SourcedCounters`): a scrape sees it as of then.

    `count_from` gives the read; until then the counter is not exported (nothing in this
    process counts it). Its ``_created`` is when `count_from` was called: the source is wired
    when it is made, and counts from 0 then. The total is exported as read, never adjusted:
    a source must not go down (Prometheus reads a counter that goes down as a reset), and
    whoever replaces a source object calls `count_from` again (a new ``_created``)."""

    __slots__ = ("created", "documentation", "name", "read", "unit")

    def __init__(self, name: str, documentation: str, unit: str = "") -> None:
        if not name.endswith("_total"):
            raise ValueError(f"a counter's exposed name ends in _total: {name}")
        self.name = name  # as exposed (CounterMetricFamily takes it with or without _total)
        self.documentation = documentation
        self.unit = unit
        self.read: Callable[[], float] | None = None
        self.created = 0.0

    def count_from(self, read: Callable[[], float]) -> None:
        """Export the running total ``read()`` returns, counted from now."""
        self.read, self.created = read, time.time()

    def family(self) -> CounterMetricFamily:
        """The counter's family without samples (what `SourcedCounters.describe` gives)."""
        return CounterMetricFamily(self.name, self.documentation, unit=self.unit)


class SourcedCounters(Collector):
    """The collector of a registry's `SourcedCounter` objects: each wired one is read when the
    registry is collected and yielded as a ``counter`` family (one sample, ``<name>`` ending
    in ``_total``, plus ``_created`` when `created_series`; the gateway's and the picker's served
    pages leave that one out, `page` renders through `WithoutCreated`, so it shows only on a
    registry collected directly). `describe` names every one, wired
    or not, so the registry refuses another metric of the same name. ``refresh``, where set, is
    called once at the start of each collect, before any read: a source that reads several
    totals at once (`telemetry.schedstat.ThreadSchedstat.sample`) then gives one snapshot."""

    def __init__(self, counters: Iterable[SourcedCounter]) -> None:
        self.counters = tuple(counters)
        self.refresh: Callable[[], object] | None = None

    def describe(self) -> Iterator[CounterMetricFamily]:
        for c in self.counters:
            yield c.family()

    def collect(self) -> Iterator[CounterMetricFamily]:
        created = created_series()
        if self.refresh is not None:
            self.refresh()
        for c in self.counters:
            if c.read is None:
                continue
            family = c.family()
            family.add_metric([], float(c.read()), created=c.created if created else None)
            yield family


_PICK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                 5.0, 10.0, 30.0)


class PickerMetrics:
    """The Envoy picker's own families (`inferplane.epp`), added to its `GatewayMetrics`
    registry: the gateway's page does not have them. ``api`` is chat, completions, embeddings,
    models or other; ``result`` is ``routed`` or the HTTP status the picker answered with in
    Envoy's place."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._decided: dict[tuple[str, str], Any] = {}
        self.decisions = Counter(
            "inferplane_epp_decisions",
            "Envoy picker: requests the picker filter brought to a decision, by api and result: "
            "routed (Envoy sends it to the picked endpoint) or the HTTP status the picker "
            "answered with in Envoy's place (401, 400, 404, 413, 429, 503 nothing eligible, "
            "500 ...); Envoy counts what its clients got (downstream_rq_xx)",
            ["api", "result"],
            registry=registry,
        )
        self.pick_seconds = Histogram(
            "inferplane_epp_pick_seconds",
            "Envoy picker: seconds from a request body's last byte to the picker's answer "
            "(authentication, admission with its queueing, placement and reservation), routed "
            "or not",
            buckets=_PICK_BUCKETS,
            registry=registry,
        )
        self.reaped = Counter(
            "inferplane_epp_flights_reaped",
            "Envoy picker: picks accounted without an observed end, by reason (unobserved: "
            "past the reaper's timeout; picker_stopped: in the air when the picker stopped; "
            "no_observer: the picker stream ended and no observer reported within the grace)",
            ["reason"],
            registry=registry,
        )

    def decided(self, api: str, result: str) -> None:
        """Count one decision in ``inferplane_epp_decisions_total``."""
        key = (api, result)
        c = self._decided.get(key)
        if c is None:
            c = self._decided[key] = self.decisions.labels(api, result)
        c.inc()


class GatewayMetrics:
    """Every metric the gateway exports."""

    def __init__(self, *, tenant_labels: bool = False) -> None:
        self.tenant_labels = tenant_labels
        self.registry = CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # `observe_placement`'s children by timing key ("stage:plugin"). `forget` leaves it:
        # the placement histogram is labelled by stage and plugin only, and none of its
        # series is ever removed.
        self._placement_children: dict[str, Any] = {}
        r = self.registry
        self._responses: dict[tuple[str, int], Any] = {}  # `responded`'s children
        self.responses = Counter(
            "inferplane_responses",
            "Every answer this gateway process gave a client on its API listener, once per "
            "request, by api and code. api: chat, completions, embeddings, models, files, "
            "batches, decisions, usage, admin (/v1/fleet/health, /console) or other (any other "
            "path, unknown routes, malformed HTTP, connections refused past "
            "max_connections_per_client); /metrics, /health and /ready are not counted. code: "
            "the HTTP status sent (an engine's status passes through on a non-streamed answer), "
            "except that a stream counts as its record ends it (502 when the upstream failed "
            "after its first byte, 500 for a fault of the gateway's) and a client that left "
            "before its answer ended as 499. Error rate: "
            "inferplane_responses_total{code=~\"5..\"} / inferplane_responses_total",
            ["api", "code"],
            registry=r,
        )
        self.requests = Counter(
            "inferplane_requests",
            "Answers from an endpoint that sent its first byte, accounted on it, by API (chat, "
            "completions, embeddings), endpoint and the HTTP status sent (the engine's, 502 "
            "for an upstream failure while reading, 499 when the client left). Not every "
            "answer the client got: attempts that failed before their first byte are in "
            "inferplane_upstream_failures_total, and a request none of whose attempts got a "
            "first byte (502) or that had nothing eligible (503) is not, nor are requests "
            "refused before placement: every answer is in inferplane_responses_total",
            ["api", "endpoint", "code"],
            registry=r,
        )
        self.upstream_failures = Counter(
            "inferplane_upstream_failures",
            "Upstream attempts that failed before the first byte of their answer (the "
            "request is re-placed while its retry budget lasts), by endpoint and reason: "
            "connect, connection, timeout, first_byte_timeout, credentials or http_<status>",
            ["endpoint", "reason"],
            registry=r,
        )
        self.stream_errors = Counter(
            "inferplane_stream_errors",
            "Streams that failed after their first byte was relayed (too late to re-place): "
            "cut, idle or malformed, or ended by the upstream's own error event, by endpoint; "
            "behind Envoy, as the picker's observer saw the stream",
            ["endpoint"],
            registry=r,
        )
        self.replacements = Counter(
            "inferplane_replacements",
            "Attempts placed again (on another endpoint where one is eligible) after an attempt "
            "failed before its first byte",
            registry=r,
        )
        self.client_disconnects = Counter(
            "inferplane_client_disconnects",
            "Requests whose client went away before their answer ended (the upstream request "
            "was cancelled)",
            registry=r,
        )
        self.ledger_commit_timeouts = Counter(
            "inferplane_ledger_commit_timeouts",
            "Answers sent before their ledger record committed (ledger.commit_timeout_s "
            "passed, or at once while the ledger's store is down: its last write failed)",
            registry=r,
        )
        # set at scrape time from the ledger (`Core.metrics_page`)
        self.ledger_store_down = Gauge(
            "inferplane_ledger_store_down",
            "1 while the ledger's store (its PostgreSQL database or SQLite file) is down: its "
            "last write failed and none has committed since; else 0",
            registry=r,
        )
        self.ledger_spooled = Gauge(
            "inferplane_ledger_spooled_records",
            "Records in the ledger's local spool (ledger.spool_path) waiting for PostgreSQL, as "
            "this process counts them; 0 without a spool",
            registry=r,
        )
        self.admission_settle_timeouts = Counter(
            "inferplane_admission_settle_timeouts",
            "Answers sent before their admission settle and usage were written "
            "(ledger.commit_timeout_s passed, or the settle failed)",
            registry=r,
        )
        self.no_endpoint = Counter(
            "inferplane_no_eligible_endpoint",
            "Endpoints removed by each placement filter in placements that left no endpoint "
            "(the request got a 503): a request adds each filter's count of removed endpoints, "
            "so the sum over filters is not a count of requests",
            ["filter"],
            registry=r,
        )
        self.spillovers = Counter(
            "inferplane_spillovers",
            "Placements outside their preferred set, by class, preferred region (the "
            "client's x-inferplane-client-region when given, else the cheapest reserved pool's "
            "or a removed reserved endpoint's; for rate_limited, the region of the endpoint "
            "that answered 429), the "
            "region placed in and reason: outage, errors, timeout, rate_limited, failover, "
            "reserved_exhausted, saturation or slo (placement.framework.SPILLOVER_REASONS)",
            ["workload_class", "from_region", "to_region", "reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "inferplane_ttft_seconds",
            "Seconds from the gateway's receipt of a streamed request to the first byte of its "
            "answer (admission queueing, placement and failed attempts included), by the "
            "endpoint that answered; non-streamed answers are not observed",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.placement = Histogram(
            "inferplane_placement_plugin_seconds",
            "Seconds each placement plugin took per placement, by stage (filter, score, "
            "pick) and plugin instance",
            ["stage", "plugin"],
            buckets=_PLUGIN_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "inferplane_endpoint_inflight",
            "Requests this gateway process has in flight on each endpoint now (sent, answer "
            "not ended)",
            ["endpoint"],
            registry=r,
        )
        self.endpoint_healthy = Gauge(
            "inferplane_endpoint_healthy",
            "1 while the endpoint passes its health check (the endpoint's health_check "
            "probe), 0 while it is down: placement skips it; always 1 for health_check: passive "
            "endpoints (the provider-api default), which are never probed: watch "
            "inferplane_endpoint_ejected",
            ["endpoint"],
            registry=r,
        )
        self.endpoint_stale = Gauge(
            "inferplane_endpoint_metrics_stale",
            "1 while the endpoint's engine metrics are older than gateway.stale_after_s or "
            "were never read: its scrapes fail or are late; always 1 for endpoints that are not "
            "scraped (scrape_metrics: false, the provider-api default)",
            ["endpoint"],
            registry=r,
        )
        self.build_info = Gauge(
            "inferplane_build_info",
            "1, labelled with the version and how placement runs: compiled (mypyc) or pure "
            "(Python; inferplane.compiled)",
            ["version", "placement"],
            registry=r,
        )
        self.build_info.labels(__version__, compiled.status().mode).set(1)
        # totals kept as plain numbers by the code that counts (an int bumped on a hot path),
        # exported as counters read when /metrics is collected (`SourcedCounter`); each is
        # wired to its source by whoever owns it (`core.plane.Core`, `api.pipeline.Gateway`)
        self.loop_lost = SourcedCounter(
            "inferplane_event_loop_lag_seconds_total",
            "Seconds the gateway's event loop ran late since start (the process descheduled or "
            "its loop held up); deadlines do not count them (inferplane.looplag)",
            unit="seconds",
        )
        self.loop_lag_max = Gauge(
            "inferplane_event_loop_lag_max_seconds",
            "The worst lateness of the gateway's event loop in the last 60 s, in seconds (each "
            "request waits that long on top of its own work)",
            registry=r,
        )
        self.send_gate_requests = SourcedCounter(
            "inferplane_send_gate_requests_total",
            "Placed requests (and re-placed attempts) that waited for the rest of their burst "
            "before being sent (gateway.send_bursts_together; inferplane.dispatch.turns)",
        )
        self.send_gate_groups = SourcedCounter(
            "inferplane_send_gate_groups_total",
            "Groups of requests sent together: requests / groups is the mean group",
        )
        # a plain int of the dispatcher (one compare per streamed chunk), set at scrape time
        self.streams_relayed = Gauge(
            "inferplane_streams_relayed",
            "Streams being relayed now (what gateway.stream_coalesce_min_streams compares)",
            registry=r,
        )
        self.coalesce_holds = SourcedCounter(
            "inferplane_stream_coalesce_holds_total",
            "Times a stream's upstream bytes were held to relay its tokens in groups since start "
            "(gateway.stream_coalesce_ms, while gateway.stream_coalesce_min_streams streams "
            "were relayed)",
        )
        # wired by the plane once its scraper runs (`core.plane`): absent before
        self.engine_scrapes = SourcedCounter(
            "inferplane_engine_scrapes_total",
            "Scrapes of engine /metrics pages this gateway process made since it started "
            "scraping (answered or not): one page request each, two when the page's path is "
            "decided (at start, every 300 s, or when the filtered page fails); a reload's "
            "look at joining endpoints not counted",
        )
        self.health_probes = SourcedCounter(
            "inferplane_health_probes_total",
            "Health probes this gateway process sent to endpoints since it started scraping "
            "(answered or not; a reload's look at joining endpoints and the probes "
            "gateway.health_skip_while_serving skipped not counted)",
        )
        # wired by the core with admission.store: redis only: absent elsewhere
        self.admission_store_resets = SourcedCounter(
            "inferplane_admission_store_resets_total",
            "Times this process found the shared admission store (Redis) had lost its data "
            "(its epoch key missing or changed when Redis answered again): budgets, usage and "
            "leases restarted from zero",
        )
        # wired by a worker of `serve --workers N` only (`api.app.serve`): absent elsewhere
        self.worker_page_refused = SourcedCounter(
            "inferplane_worker_page_refused_total",
            "Connections to this worker's metrics page socket closed unanswered: their process "
            "ran as another user, or could not be identified (serve --workers; telemetry.gather)",
        )
        self._schedstat_metrics()
        # the admission store's own totals (`admission.state.StoreHealth`), wired by the core
        # where the store keeps them (the local SQLite store, Redis behind its outage store)
        self.store_outages = SourcedCounter(
            "inferplane_admission_store_outages_total",
            "Times the admission store stopped taking writes (the local store's file, or Redis) "
            "since start",
        )
        self.store_dropped = SourcedCounter(
            "inferplane_admission_store_dropped_total",
            "Budget settles the local admission store dropped since start: past its cap of "
            "pending settles during an outage, or that could not apply (logged)",
        )
        self._sourced = SourcedCounters(
            (self.loop_lost, self.send_gate_requests, self.send_gate_groups, self.coalesce_holds,
             self.loop_cpu, self.loop_runqueue_wait, self.loop_slices, self.process_runqueue_wait,
             self.worker_page_refused, self.engine_scrapes, self.health_probes,
             self.store_outages, self.store_dropped, self.admission_store_resets)
        )
        r.register(self._sourced)
        self._admission_metrics(r)
        self._health_metrics(r)

    def _schedstat_metrics(self) -> None:
        """The event loop's thread's CPU time and run-queue wait, and the whole process's wait,
        from Linux's schedstat (`telemetry.schedstat`; wired by `count_schedstat`)."""
        self.loop_cpu = SourcedCounter(
            "inferplane_event_loop_cpu_seconds_total",
            "Seconds the event loop's thread ran on a CPU (Linux schedstat)",
            unit="seconds",
        )
        self.loop_runqueue_wait = SourcedCounter(
            "inferplane_event_loop_runqueue_wait_seconds_total",
            "Seconds the event loop's thread was ready to run but waited on a CPU's run queue "
            "(Linux schedstat run_delay; not I/O wait)",
            unit="seconds",
        )
        self.loop_slices = SourcedCounter(
            "inferplane_event_loop_timeslices_total",
            "Times the event loop's thread was put on a CPU (Linux schedstat)",
        )
        self.process_runqueue_wait = SourcedCounter(
            "inferplane_process_runqueue_wait_seconds_total",
            "Seconds this process's threads (all of them, exited ones up to their last scrape) "
            "were ready to run but waited on a CPU's run queue (Linux schedstat run_delay)",
            unit="seconds",
        )
        self._loop_schedstat: schedstat.ThreadSchedstat | None = None

    def count_schedstat(self, thread: str | Path = schedstat.THREAD_SELF,
                        tasks: Path = schedstat.TASKS) -> bool:
        """Export the schedstat counters of the event loop's thread and of the whole process.
        Call it on the loop's thread: ``thread`` (``/proc/thread-self/schedstat``) is opened
        here, stays bound to the thread that opened it, and is re-read once per collect
        (`SourcedCounters.refresh`); ``tasks`` (``/proc/self/task``) is listed and each
        thread's file read at each collect. False, and the four stay unexported, where the
        loop's thread has no schedstat to read (not Linux, a kernel without it). `close_schedstat`
        closes the file."""
        self.close_schedstat()
        loop = schedstat.ThreadSchedstat(thread)
        if not loop.available:
            log.debug("no scheduler statistics at %s: the event loop's CPU and run-queue wait "
                      "counters are not exported", thread)
            return False
        self._loop_schedstat = loop
        self._sourced.refresh = loop.sample
        self.loop_cpu.count_from(loop.cpu_s)
        self.loop_runqueue_wait.count_from(loop.wait_s)
        self.loop_slices.count_from(loop.slices)
        process = schedstat.ProcessWait(tasks)
        if process.available:
            self.process_runqueue_wait.count_from(process.wait_s)
        return True

    def close_schedstat(self) -> None:
        """Close the loop thread's schedstat file (`count_schedstat`); its counters stay at
        their last values."""
        if self._loop_schedstat is not None:
            self._loop_schedstat.close()

    def _health_metrics(self, r: CollectorRegistry) -> None:
        """Outlier ejection and per-pool concurrency health (`fleet.health`). ``reason_kind``
        is a `fleet.health.ReasonKind` (the seven in the help), or empty for an ejection
        recorded without a kind; ``verdict`` one of ok, pressure, past-envelope."""
        self.endpoint_ejections = Counter(
            "inferplane_endpoint_ejections",
            "Outlier ejections (the endpoint is taken out of placement for a while), by "
            "endpoint and reason kind: error_rate, stale, ttft, rate_limited, passive, "
            "consecutive_5xx or first_byte_timeout (fleet.health.ReasonKind)",
            ["endpoint", "reason_kind"],
            registry=r,
        )
        self.endpoint_ejected = Gauge(
            "inferplane_endpoint_ejected",
            "1 while the endpoint is ejected as an outlier (no traffic until its half-open "
            "return), else 0",
            ["endpoint"],
            registry=r,
        )
        self.pool_queue_trend = Gauge(
            "inferplane_pool_queue_trend",
            "Least-squares slope of the pool's engines' waiting requests over the health "
            "window, in requests per second (> 0: the queue grows)",
            ["substrate"],
            registry=r,
        )
        self.pool_kv_pressure = Gauge(
            "inferplane_pool_kv_pressure",
            "KV-cache usage of the pool's engines over the health window, 0-1, by pool and "
            "stat (mean or max)",
            ["substrate", "stat"],
            registry=r,
        )
        self.pool_ttft_divergence = Gauge(
            "inferplane_pool_ttft_divergence",
            "Observed TTFT P99 / P50 across the pool's endpoints over the health window (0 "
            "with too few samples): a growing ratio is queueing",
            ["substrate"],
            registry=r,
        )
        self.pool_inflight_ratio = Gauge(
            "inferplane_pool_inflight_ratio",
            "The gateway's in-flight requests on the pool / the concurrency envelope of its "
            "usable endpoints (> 1: past the envelope)",
            ["substrate"],
            registry=r,
        )
        self.pool_verdict = Gauge(
            "inferplane_pool_verdict",
            "1 for the pool's current concurrency-health verdict (ok, pressure or "
            "past-envelope), 0 for the other two: alert on verdict=\"past-envelope\" == 1",
            ["substrate", "verdict"],
            registry=r,
        )

    def _admission_metrics(self, r: CollectorRegistry) -> None:
        """Admission and cost attribution. ``tenant`` and ``workload_class`` come from config;
        workflows are never a label (see ``GET /v1/usage``); ``reason`` is a fixed set of codes."""
        self.admitted_requests = Counter(
            "inferplane_admission_requests",
            "Requests that reached admission's retry check (past the token ceiling and loop "
            "limits), by tenant ('all' unless gateway.metrics.tenant_labels) and class: the "
            "denominator of the retry rate",
            ["tenant", "workload_class"],
            registry=r,
        )
        self.admission_rejected = Counter(
            "inferplane_admission_rejected",
            "Requests refused by admission's checks (budgets, rate limits, loop limits, token "
            "ceilings …), by tenant ('all' unless gateway.metrics.tenant_labels) and reason: "
            "the error code the client got (error.code, else error.type)",
            ["tenant", "reason"],
            registry=r,
        )
        self.client_retries = Counter(
            "inferplane_client_retries",
            "Requests recognised as client retries (a re-send, by Idempotency-Key or same body "
            "and key, of a request that failed within admission.retry.window_s); "
            "retry rate = this / inferplane_admission_requests_total",
            ["tenant", "workload_class"],
            registry=r,
        )
        self.max_tokens_clamped = Counter(
            "inferplane_max_tokens_clamped",
            "Requests whose max_tokens was lowered to a ceiling (max_tokens_ceiling of the "
            "class or the tenant), by tenant ('all' unless gateway.metrics.tenant_labels) and "
            "class",
            ["tenant", "workload_class"],
            registry=r,
        )
        self.tool_fanout = Histogram(
            "inferplane_agent_tool_fanout",
            "Tools offered (kind=tools) and tool results carried (kind=results) per request "
            "that has either or an x-inferplane-agent-step header, by class",
            ["workload_class", "kind"],
            buckets=(0, 1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.queue_wait = Histogram(
            "inferplane_admission_queue_wait_seconds",
            "Seconds a queued request waited in the admission queue for a free slot, by "
            "priority band",
            ["band"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "inferplane_admission_queue_depth",
            "Requests waiting in the admission queue, by priority band",
            ["band"],
            registry=r,
        )
        self.store_up = Gauge(
            "inferplane_admission_store_up",
            "Whether the admission store takes writes now (1), or is in an outage (0: the "
            "local store's file cannot be written, or Redis cannot be reached; budgets answer "
            "503 and spend waits in inferplane_admission_store_pending); 1 for a store in "
            "memory",
            registry=r,
        )
        self.store_down_seconds = Gauge(
            "inferplane_admission_store_outage_seconds",
            "How long the admission store's current outage has lasted, in seconds (0 when up)",
            registry=r,
        )
        self.store_pending = Gauge(
            "inferplane_admission_store_pending",
            "Updates the admission store keeps until it can write them, by kind: budget "
            "settles (in order) and usage rows (the local store merges them per tenant and "
            "group; Redis's outage journal keeps each)",
            ["kind"],
            registry=r,
        )
        self.replacement_budget_exhausted = Counter(
            "inferplane_replacement_budget_exhausted",
            "Re-placements refused because the retry budget (admission.retry) was spent: the "
            "client got the failed attempt's error",
            registry=r,
        )
        self.tenant_tokens = Counter(
            "inferplane_tenant_tokens",
            "Tokens served, by tenant ('all' unless gateway.metrics.tenant_labels), class and "
            "kind (prompt or completion)",
            ["tenant", "workload_class", "kind"],
            registry=r,
        )
        self.tenant_cost = Counter(
            "inferplane_tenant_cost_usd",
            "US dollars attributed to served requests at the serving substrate's prices, by "
            "tenant ('all' unless gateway.metrics.tenant_labels) and class",
            ["tenant", "workload_class"],
            registry=r,
        )

        self.config_reloads = Counter(
            "inferplane_config_reloads",
            "Fleet file reloads (SIGHUP or a change of the file), by result (ok or error)",
            ["result"],
            registry=r,
        )
        self.config_last_reload_ok = Gauge(
            "inferplane_config_last_reload_successful",
            "Whether the last fleet file reload was applied (1) or refused (0)",
            registry=r,
        )
        self.config_last_reload_ok.set(1)
        self.config_last_reload_time = Gauge(
            "inferplane_config_last_reload_success_timestamp_seconds",
            "When the running fleet file was loaded (start-up or the last applied reload), in "
            "Unix seconds",
            registry=r,
        )
        self.config_hash = Gauge(
            "inferplane_config_info",
            "1, labelled with the SHA-256 of the running fleet file (differs between "
            "replicas running different files)",
            ["sha256"],
            registry=r,
        )
        self.config_replicas = Gauge(
            "inferplane_config_replicas",
            "Processes sharing this gateway's Redis (admission.store: redis; every replica, "
            "worker and picker on one admission.redis_prefix) that run each fleet file, by its "
            "SHA-256, as last read from Redis (every 15 s and after a reload)",
            ["sha256"],
            registry=r,
        )
        self.config_replicas_disagree = Gauge(
            "inferplane_config_replicas_disagree",
            "1 while the processes sharing this gateway's Redis run more than one fleet file "
            "(inferplane_config_replicas has more than one series), else 0",
            registry=r,
        )
        self.config_replicas_stale = Gauge(
            "inferplane_config_replicas_stale",
            "1 while the last attempt to read the processes' fleet files from Redis failed "
            "(inferplane_config_replicas and _disagree keep an older reading), else 0",
            registry=r,
        )
        self._config_shas: set[str] = set()

    def config_peers_seen(self, counts: Mapping[str, int]) -> None:
        """What `admission.config_peers.ConfigPeers` read: live processes by fleet file."""
        for sha in self._config_shas - set(counts):
            self.config_replicas.remove(sha)
        self._config_shas = set(counts)
        for sha, n in counts.items():
            self.config_replicas.labels(sha).set(n)
        self.config_replicas_disagree.set(1 if len(counts) > 1 else 0)

    def by_endpoint(self) -> tuple[Any, ...]:
        """The metrics labelled by ``endpoint``."""
        return (self.requests, self.upstream_failures, self.stream_errors, self.ttft,
                self.inflight, self.endpoint_healthy, self.endpoint_stale,
                self.endpoint_ejections, self.endpoint_ejected)

    def by_substrate(self) -> tuple[Any, ...]:
        """The metrics labelled by ``substrate`` (a pool)."""
        return (self.pool_queue_trend, self.pool_kv_pressure, self.pool_ttft_divergence,
                self.pool_inflight_ratio, self.pool_verdict)

    def forget(self, endpoints: Iterable[str] = (), substrates: Iterable[str] = ()) -> None:
        """Remove every series of these endpoints and substrates (a fleet reload removed
        them), so that ``/metrics`` stops exporting what is no longer in the fleet."""
        gone = False
        for name in endpoints:
            for m in self.by_endpoint():
                m.remove_by_labels({"endpoint": name})
            gone = True
        for name in substrates:
            for m in self.by_substrate():
                m.remove_by_labels({"substrate": name})
            gone = True
        if gone:  # cached children of removed series would write to nothing exported
            self._children.clear()

    def tenant(self, name: str) -> str:
        """The ``tenant`` label value: the tenant's name only with ``gateway.metrics.tenant_labels``
        (whoever reads /metrics would otherwise see every tenant's tokens and spend), else
        ``"all"``."""
        return name if self.tenant_labels else "all"

    def observe_placement(self, timings_s: dict[str, float]) -> None:
        """A decision's plugin timings (``"stage:plugin": seconds``) into
        ``inferplane_placement_plugin_seconds``."""
        children = self._placement_children
        for key, seconds in timings_s.items():
            c = children.get(key)
            if c is None:
                stage, _, plugin = key.partition(":")
                c = children[key] = self.child(self.placement, stage, plugin)
            c.observe(seconds)

    def responded(self, api: str, status: int) -> None:
        """Count one answer in ``inferplane_responses_total`` (``api`` one of
        `RESPONSE_API_LABELS`: a ValueError otherwise, checked once per new child)."""
        key = (api, status)
        c = self._responses.get(key)
        if c is None:
            if api not in RESPONSE_API_LABELS:
                raise ValueError(f"inferplane_responses_total: api {api!r} is not one of "
                                 f"{sorted(RESPONSE_API_LABELS)}")
            c = self._responses[key] = self.responses.labels(api, str(status))
        c.inc()

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: the request path avoids prometheus' label lookup."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c
