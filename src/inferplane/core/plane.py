"""The transport-neutral core: classify → admit → place → reserve → account.

`Core` owns the long-lived parts (fleet state, scrapers, policies, admission, ledger, metrics,
outlier ejection) and the stages of one request. It imports no HTTP library: a front end (the
aiohttp gateway in `api/`, the Envoy ext_proc picker in `epp/`, the batch lane) reads the
client's request, calls these stages, moves the bytes to and from the engine in its own way and
hands the core what it observed of the answer through one typed seam, `Core.account` (status,
`StreamStats`, usage, error, end time).

A front end that calls the engine itself passes its send function to `Core.open_with`, which
places, reserves and re-places after a failure before the first byte (`UpstreamAttemptFailed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from inferplane.admission.controller import Admission, Ticket
from inferplane.admission.queue import BANDS, QueueTimeoutError
from inferplane.admission.state import IN_MEMORY, AdmissionStore, StoreHealth
from inferplane.config.loader import parse_config, read_text
from inferplane.config.schema import FleetConfig, ModelAlias, TenantSpec
from inferplane.core.reload import policies_changed, refreeze_after_reload, restart_needed
from inferplane.dispatch.answer import StreamStats, UpstreamAttemptFailed, parse_usage
from inferplane.dispatch.turns import TurnGate
from inferplane.economics.render import refresher_for
from inferplane.errors import (
    AuthenticationError,
    ConfigError,
    EndpointsRateLimitedError,
    GatewayError,
    InvalidRequestError,
    ModelNotFoundError,
    NoEligibleEndpointError,
    UpstreamError,
    UpstreamRateLimitedError,
    retry_after_header,
)
from inferplane.fleet.energy import endpoint_power_w, request_energy_j
from inferplane.fleet.health import VERDICTS, OutlierDetector, PoolHealth, pool_health
from inferplane.fleet.kv_subscriber import KVEventSubscriber
from inferplane.fleet.live import LiveFleet, Reservation
from inferplane.fleet.model import Endpoint, Fleet
from inferplane.fleet.passive import PassiveHealth
from inferplane.fleet.prefix_index import PrefixIndex
from inferplane.fleet.pricing import request_cost_usd
from inferplane.fleet.salts import SaltBook
from inferplane.fleet.scraper import MetricsSource, Scraper, idle_wait_cap
from inferplane.fleet.state import EndpointView
from inferplane.ledger.build import build_ledger
from inferplane.ledger.record import Ledger, Outcome, Receipt
from inferplane.lograte import LogLimiter
from inferplane.looplag import LoopLag
from inferplane.placement.build import build_policies
from inferplane.placement.classify import Classifier
from inferplane.placement.framework import CycleState, Decision, Policy, Spillover, place
from inferplane.placement.isolation import cache_salt, cache_scope
from inferplane.placement.plugins.affinity import SessionAffinity
from inferplane.placement.profile import RequestProfile
from inferplane.placement.tiers import choose_tier
from inferplane.telemetry.metrics import GatewayMetrics
from inferplane.telemetry.metrics import page as metrics_page
from inferplane.telemetry.tracing import NOOP, RequestTrace, build_telemetry, current_trace
from inferplane.types import ApiKind, JSONObject

if TYPE_CHECKING:
    from inferplane.admission.config_peers import ConfigPeers
    from inferplane.admission.shared_placement import SharedPick, SharedPlacement
    from inferplane.admission.slots import SharedSlots

R = TypeVar("R")

log = logging.getLogger("inferplane.core")

API_PATHS: dict[ApiKind, str] = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}


def hash_key(key: str) -> str:
    """The stored form of an API key: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(slots=True)
class Placement:
    """A placed request holding its endpoint's reservation (released once, by `Core.account`
    or by a failed attempt)."""

    decision: Decision
    reservation: Reservation
    failed: list[str] = field(default_factory=list)
    ticket: Ticket | None = None
    trace: RequestTrace = NOOP  # the request's spans (`telemetry.tracing`)

    @property
    def endpoint_name(self) -> str:
        assert self.decision.picked is not None
        return self.decision.picked.name

    @property
    def endpoint(self) -> Endpoint:
        assert self.decision.picked is not None
        return self.decision.picked.endpoint


@dataclass(slots=True)
class Attempt(Placement, Generic[R]):
    """A placement whose upstream has answered with a status line; ``response`` is the front
    end's own handle on that answer."""

    response: R = field(kw_only=True)


class Core:
    """One process's plane state and the transport-neutral stages of a request.

    A front end subclasses it to supply its transport: `_start_transport` returns the source of
    engine metrics (unless one was passed in) and `_stop_transport` closes what it opened.
    """

    # whether this process sees a streamed answer's chunks (and so its first token); the Envoy
    # picker without its observer filter does not
    sees_chunks = True

    def __init__(
        self,
        config: FleetConfig,
        file: str = "<config>",
        *,
        metrics_source: MetricsSource | None = None,
        ledger: Ledger | None = None,
        admission_store: AdmissionStore | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        # ``clock`` (wall seconds: budget windows, usage days) and ``monotonic`` (fleet state,
        # queue waits, retry budget) are injectable so that the simulator runs this core on its
        # virtual clock
        self.config = config
        self.fleet = Fleet.from_config(config)
        g = config.gateway
        # A precise prefix index exists only where engines publish KV events.
        self.prefix_index: PrefixIndex | None = None
        self.kv_events: KVEventSubscriber | None = None
        self.salts: SaltBook | None = None  # the KV-event mirror's cache scopes
        if any(e.spec.kv_events for e in self.fleet.endpoints):
            self.prefix_index = PrefixIndex(0)
            self.salts = SaltBook(
                (cache_salt(cache_scope(t.name, t.cache_group)) for t in config.tenants),
                clock=monotonic,
            )
            self.kv_events = KVEventSubscriber(
                self.prefix_index, list(self.fleet.endpoints), self.salts
            )
        self.live = LiveFleet(
            self.fleet,
            stale_after_s=g.stale_after_s,
            error_half_life_s=config.health.outlier.error_half_life_s,
            clock=monotonic,
            prefix_index=self.prefix_index,
        )
        self.policies: dict[str, Policy] = build_policies(config, file)
        self.class_policy: dict[str, Policy] = {
            c.name: self.policies[c.profile or g.default_profile] for c in config.classes
        }
        self.classifier = Classifier(config)
        self.aliases: dict[str, ModelAlias] = {a.name: a for a in config.model_aliases}
        self.tenants: dict[str, TenantSpec] = {h: t for t in config.tenants for h in t.api_keys}
        self.metrics = GatewayMetrics(tenant_labels=g.metrics.tenant_labels)
        self.telemetry = build_telemetry(config)  # OpenTelemetry, when the fleet file says so
        self.ledger: Ledger = ledger or build_ledger(config, file)
        self._metrics_source = metrics_source
        self.scraper: Scraper | None = None
        # the event loop's own lag (a loaded host descheduling the gateway): deadlines on the
        # request path, health probes and Redis calls count running time only
        # (`inferplane.looplag`), each up to its wall-time cap
        self.lag = LoopLag()
        self.turn_gate = TurnGate()  # gateway.send_bursts_together
        # counters of their plain totals, read when /metrics is collected; the lambdas read
        # whatever object is current: replacing one (the new one counts from 0) requires
        # calling count_from again, for a _created that says when the count restarted
        self.metrics.loop_lost.count_from(lambda: self.lag.lost_now())
        self.metrics.send_gate_requests.count_from(lambda: self.turn_gate.held)
        self.metrics.send_gate_groups.count_from(lambda: self.turn_gate.groups)
        self.admission = Admission(
            config,
            self.live,
            self.metrics,
            store=admission_store,
            clock=clock,
            monotonic=monotonic,
            lag=self.lag,
        )
        if hasattr(kept := self.admission.store, "health"):
            # a store that can be out of service: its outage totals, read as they are (the rest
            # from one health() a scrape)
            self.metrics.store_outages.count_from(lambda: getattr(kept, "outages", 0))
            self.metrics.store_dropped.count_from(lambda: getattr(kept, "dropped", 0))
        if hasattr(kept, "resets"):  # Redis: times it was found to have lost its data
            self.metrics.admission_store_resets.count_from(lambda: getattr(kept, "resets", 0))
        self.outliers = OutlierDetector(self.fleet, config.health.outlier)
        self.slots: SharedSlots | None = None
        spec = config.admission
        if spec.store == "redis" and spec.shared_slots:
            # imported here: redis (and the OpenTelemetry SDK it loads) only when configured
            from inferplane.admission.slots import SharedSlots

            self.slots = SharedSlots(
                spec.redis_url,
                spec.redis_prefix,
                limits={e.name: e.max_concurrency for e in self.fleet.endpoints},
                on_remote=self.live.set_remote_inflight,
                lease_s=spec.slot_lease_s,
                sync_s=spec.slot_sync_s,
                timeout_s=spec.redis_timeout_s,
                retry_after_s=spec.outage_retry_after_s,
                lag=self.lag,
                max_stretch=g.lag_max_stretch,
            )
        self.shared: SharedPlacement | None = None
        if spec.store == "redis" and spec.shared_placement:
            from inferplane.admission.shared_placement import SharedPlacement

            self.shared = SharedPlacement(
                spec.redis_url,
                spec.redis_prefix,
                on_pick=self.learn_shared,
                session_ttl_s=spec.session_ttl_s,
                timeout_s=spec.redis_timeout_s,
                retry_after_s=spec.outage_retry_after_s,
                clock=monotonic,
                lag=self.lag,
                max_stretch=g.lag_max_stretch,
            )
        self.peers: ConfigPeers | None = None
        if spec.store == "redis":
            from inferplane.admission.config_peers import ConfigPeers

            # which fleet file each process sharing this Redis runs (`set_config_sha256`)
            self.peers = ConfigPeers(
                spec.redis_url, spec.redis_prefix, on_seen=self.metrics.config_peers_seen,
                on_stale=self.metrics.config_replicas_stale.set,
                timeout_s=spec.redis_timeout_s, lag=self.lag, max_stretch=g.lag_max_stretch,
            )
        self.passive = PassiveHealth(self.live, self.outliers, config.health.outlier)
        # a failed upstream attempt or stream: one WARNING per endpoint per 30 s (`lograte`)
        self.failure_log = LogLimiter(log)
        self._health_task: asyncio.Task[None] | None = None
        self.economics = refresher_for(config, file, self.metrics.registry)
        self.config_sha256: str | None = None  # the fleet file's, when the caller knows it
        self.stopping: str | None = None  # the step of `stop` under way (for a stuck shutdown)
        # SIGTERM came and the listener stays open gateway.drain_delay_s: /ready answers 503
        self.draining = False
        self._reload_lock = asyncio.Lock()
        # endpoints and substrates a reload removed whose metric series are still exported
        # (`forget_removed`)
        self._removed_endpoints: set[str] = set()
        self._removed_substrates: set[str] = set()
        self.metrics.config_last_reload_time.set(time.time())

    # -- lifecycle ------------------------------------------------------------------------
    async def _start_transport(self) -> MetricsSource | None:
        """Open the front end's transport; return the engines' metrics source it provides."""
        return None

    async def _stop_transport(self) -> None:
        """Close what `_start_transport` opened."""

    def requests_in_flight(self) -> tuple[int, int]:
        """(requests sent to an endpoint, requests waiting in the admission queue) of this
        process, for the line a process logs when it starts stopping."""
        sent = sum(rec.inflight for rec in self.live.live.values())
        return sent, sum(self.admission.queue.depth(b) for b in BANDS)

    async def _drain(self) -> None:
        """First step of `stop`: end what the front end still holds of requests in flight, so
        their records and settles reach the ledger and the admission store before those close."""

    async def start(self) -> None:
        self.lag.start()
        # the loop's thread's CPU time and run-queue wait, and the process's wait (Linux
        # schedstat, read at each /metrics collect; absent where the kernel has none). This
        # runs on the loop's thread, which opens its own /proc/thread-self/schedstat here
        self.metrics.count_schedstat()
        source = await self._start_transport()
        source = self._metrics_source or source
        if source is None:
            raise RuntimeError("no metrics source: pass one or supply it in _start_transport")
        g = self.config.gateway
        quiet = idle_wait_cap(g.scrape_quiet_interval_s, g.stale_after_s,
                              self.config.health.outlier.stale_eject_s)
        self.scraper = Scraper(
            self.live, source, interval_s=g.scrape_interval_s,
            health_interval_s=g.health_interval_s, max_duty=g.scrape_max_duty,
            max_interval_s=g.scrape_max_interval_s, quiet_interval_s=quiet,
            quiet_busy=g.scrape_quiet_busy and quiet is not None,
            skip_probe_while_serving=g.health_skip_while_serving,
            skip_window_s=g.health_skip_window_s, lag=self.lag,
        )
        scraper = self.scraper
        self.metrics.engine_scrapes.count_from(lambda: scraper.scrapes)
        self.metrics.health_probes.count_from(lambda: scraper.probes)
        await self.scraper.prime()
        self.scraper.start()
        if self.config.health.outlier.enabled:
            self._health_task = asyncio.create_task(self._health_loop())
        if self.kv_events is not None:
            self.kv_events.start()
        await self.ledger.start()
        await self.admission.start()
        if self.economics is not None:
            self.economics.start()
        # an admission store that started degraded (Redis down, a journal to replay): the
        # other Redis users start as during an outage too; with admission.start_without_redis
        # also a Redis gone down between the two (refused, a timeout: `transient`), never a
        # misconfiguration (an ACL that refuses their commands is a start-up error)
        store_down = getattr(self.admission.store, "up", True) is False
        without_redis = self.config.admission.start_without_redis

        def degraded(exc: BaseException) -> bool:
            from inferplane.admission.outage import transient

            return store_down or (without_redis and transient(exc))
        if self.slots is not None:
            await self.slots.start(degraded=degraded)
        if self.shared is not None:
            await self.shared.start(degraded=degraded)
        if self.peers is not None:
            self.peers.start()  # never a start-up error: it tries again every interval

    async def stop(self) -> None:
        """Stop everything `start` started. Every step runs even when an earlier one fails (a
        failure is logged), so the ledger is always flushed and closed; a cancellation of the
        stop itself is re-raised once every step ran."""
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("requests in flight", self._drain),
            ("outlier sweeps", self._stop_health),
            ("loop-lag ticker", self.lag.stop),
        ]
        if self.economics is not None:
            steps.append(("economics gauges", self.economics.stop))
        if self.scraper is not None:
            steps.append(("scraper", self.scraper.stop))
        if self.kv_events is not None:
            steps.append(("KV-event subscriber", self.kv_events.stop))
        if self.slots is not None:
            steps.append(("shared slots", self.slots.close))
        if self.shared is not None:
            steps.append(("shared placement state", self.shared.close))
        if self.peers is not None:
            steps.append(("fleet file comparison", self.peers.close))
        steps += [
            ("ledger", self.ledger.close),
            ("admission", self.admission.close),
            ("transport", self._stop_transport),
            ("telemetry", self._stop_telemetry),
            ("schedstat", self._stop_schedstat),
        ]
        interrupted: BaseException | None = None
        for what, step in steps:
            self.stopping = what
            try:
                await step()
            except Exception:
                log.exception("stopping the %s failed", what)
            except BaseException as exc:  # cancelled: finish stopping, then re-raise
                interrupted = interrupted or exc
        self.stopping = "stopped"
        if interrupted is not None:
            raise interrupted

    async def _stop_telemetry(self) -> None:
        if self.telemetry.enabled:  # the last spans and metrics flushed, off the event loop
            await asyncio.to_thread(self.telemetry.shutdown)

    async def _stop_schedstat(self) -> None:
        self.metrics.close_schedstat()

    async def _stop_health(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None

    # -- reload ---------------------------------------------------------------------------
    def set_config_sha256(self, sha256: str | None) -> None:
        """Record the running fleet file's SHA-256 (``inferplane_config_info``)."""
        if sha256 == self.config_sha256:
            return
        if self.config_sha256 is not None:
            with contextlib.suppress(KeyError):
                self.metrics.config_hash.remove(self.config_sha256)
        self.config_sha256 = sha256
        if sha256 is not None:
            self.metrics.config_hash.labels(sha256).set(1)
        if self.peers is not None:
            self.peers.set_sha256(sha256)  # published to the other replicas at once

    def _prepare_transport(self, config: FleetConfig, file: str) -> Callable[[], None]:
        """Check what the front end's transport needs of a reloaded ``config`` (credentials,
        addresses) and return the function that applies it; raise `ConfigError`."""
        return lambda: None

    async def reload_file(self, path: str | Path) -> Reloaded | None:
        """Read, validate and apply the fleet file at ``path`` (`reload`). A file that is
        invalid, or changes what needs a restart, is logged (file and field) and counted
        (``inferplane_config_reloads_total{result="error"}``); the running configuration is
        kept. Returns what changed, or None when refused."""
        p = Path(path)
        try:
            text = await asyncio.to_thread(read_text, p)
            sha = hashlib.sha256(text.encode()).hexdigest()
            config = await asyncio.to_thread(parse_config, text, str(p), base_dir=p.parent)
            return await self.reload(config, str(p), sha256=sha)
        except ConfigError as exc:
            self.metrics.config_reloads.labels("error").inc()
            self.metrics.config_last_reload_ok.set(0)
            log.error("fleet reload refused; the running configuration is unchanged:\n%s", exc)
            return None

    async def reload(
        self, config: FleetConfig, file: str, *, sha256: str | None = None
    ) -> Reloaded:
        """Swap in a reloaded, already parsed fleet file; raise `ConfigError` (nothing changed)
        when it cannot be applied. What may change and what needs a restart:
        `inferplane.core.reload`.

        Everything that can fail is built first (fleet, policies, classifier, the front end's
        credentials); new endpoints are then scraped and probed once; the swap itself runs in
        one step of the event loop, so a request is placed either on the old fleet or on the
        new one. Requests in flight keep their endpoint and account to it."""
        async with self._reload_lock:
            t0 = time.perf_counter()
            try:
                problems = restart_needed(self.config, config)
                if problems:
                    raise ConfigError(file, problems)
                fleet = Fleet.from_config(config)
                rebuild = policies_changed(self.config, config)
                policies = build_policies(config, file) if rebuild else self.policies
                classifier = Classifier(config)
                apply_transport = self._prepare_transport(config, file)
            except ConfigError as exc:
                raise exc if exc.file == file else ConfigError(file, exc.problems) from None
            except Exception as exc:  # e.g. a calibrated profile that does not load
                raise ConfigError(file, [("", f"cannot apply: {type(exc).__name__}: {exc}")]) \
                    from None
            old = self.fleet.by_name
            old_config = self.config
            old_substrates = {sub.name for sub in self.config.substrates}
            joining = [e for e in fleet.endpoints if e.name not in old or old[e.name].url != e.url]
            observed = await self.scraper.observe(joining) if self.scraper is not None else []
            # -- the swap: no await from here on ---------------------------------------------
            kept_specs = {
                n for n, e in old.items()
                if n in fleet.by_name and fleet.by_name[n].same_definition(e)
            }
            self.config = config
            self.fleet = fleet
            fresh, removed = self.live.reconfigure(fleet)
            self.outliers.reconfigure(fleet, fresh)
            if self.scraper is not None:
                self.scraper.reconfigure(fresh)
                self.scraper.apply(observed)
            self.policies = policies
            self.class_policy = {
                c.name: policies[c.profile or config.gateway.default_profile]
                for c in config.classes
            }
            self.classifier = classifier
            self.telemetry.fleet_changed(fleet)
            self.aliases = {a.name: a for a in config.model_aliases}
            self.tenants = {h: t for t in config.tenants for h in t.api_keys}
            if self.salts is not None:  # the KV-event mirror's cache scopes: every tenant's
                self.salts.set_scopes(
                    cache_salt(cache_scope(t.name, t.cache_group)) for t in config.tenants
                )
            self.admission.fleet_changed()
            if self.slots is not None:
                self.slots.set_limits({e.name: e.max_concurrency for e in fleet.endpoints})
            if self.economics is not None:
                self.economics.config = config
            apply_transport()
            self.admission.queue.pump()  # new capacity: waiters may go
            self.metrics.config_reloads.labels("ok").inc()
            self.metrics.config_last_reload_ok.set(1)
            self.metrics.config_last_reload_time.set(time.time())
            self.set_config_sha256(sha256)
            self._removed_endpoints = (self._removed_endpoints | set(removed)) - set(
                fleet.by_name
            )
            kept = {sub.name for sub in config.substrates}
            self._removed_substrates = (self._removed_substrates | (old_substrates - kept)) - kept
            self.forget_removed()
            refreeze_after_reload(config.gateway.gc_freeze)
            added = tuple(n for n in fleet.by_name if n not in old)
            out = Reloaded(
                added=added,
                removed=tuple(removed),
                changed=tuple(n for n in fleet.by_name if n in old and n not in kept_specs),
                policies_rebuilt=rebuild,
                seconds=time.perf_counter() - t0,
                draining=sum(r.inflight for r in map(self.live.live.get, removed) if r is not None),
            )
            gone = "none" if not out.removed else f"{list(out.removed)} (" + (
                f"draining {out.draining}" if out.draining else "none") + " in flight)"
            log.info(
                "fleet reloaded from %s: %d endpoints; added %s; removed %s; "
                "changed %s; placement policies %s (%.0f ms)",
                file, len(fleet.endpoints), list(out.added) or "none", gone,
                list(out.changed) or "none",
                "rebuilt" if rebuild else "kept", out.seconds * 1000,
            )
            _log_tenant_changes(old_config, config)
            return out

    def forget_removed(self) -> None:
        """Remove the metric series of what reloads removed from the fleet: substrates at once,
        an endpoint once its requests in flight have drained (until then they still account
        to it). Called on each reload and before each ``/metrics`` answer."""
        if not (self._removed_endpoints or self._removed_substrates):
            return
        drained = {
            n for n in self._removed_endpoints
            if (rec := self.live.live.get(n)) is None or rec.inflight <= 0
        }
        self.metrics.forget(endpoints=drained, substrates=self._removed_substrates)
        self._removed_endpoints -= drained
        self._removed_substrates = set()

    # -- health ---------------------------------------------------------------------------
    def metrics_page(self) -> bytes:
        """The process's Prometheus page: the gauges read from live state set (endpoints,
        loop lag, pools, admission queue), then the registry rendered in the text format."""
        self.forget_removed()  # series of endpoints a reload removed, once drained
        m = self.metrics
        for v in self.live.snapshot().endpoints:
            m.inflight.labels(v.name).set(v.state.inflight)
            m.endpoint_healthy.labels(v.name).set(1 if v.state.healthy else 0)
            m.endpoint_stale.labels(v.name).set(1 if v.state.stale else 0)
            m.endpoint_ejected.labels(v.name).set(1 if v.state.ejected else 0)
        m.loop_lag_max.set(self.lag.recent_max_s(asyncio.get_running_loop().time()))
        m.ledger_store_down.set(1 if self.ledger.writes_failing else 0)
        m.ledger_spooled.set(self.ledger.spooled)
        # the running totals (loop lag, send gate, coalescing holds) are counters read as the
        # registry is collected (telemetry.metrics.SourcedCounters)
        for name, p in self.pool_health().items():
            m.pool_queue_trend.labels(name).set(p.queue_trend)
            m.pool_kv_pressure.labels(name, "mean").set(p.kv_mean or 0.0)
            m.pool_kv_pressure.labels(name, "max").set(p.kv_max or 0.0)
            m.pool_ttft_divergence.labels(name).set(p.ttft_divergence or 0.0)
            m.pool_inflight_ratio.labels(name).set(p.inflight_ratio or 0.0)
            for verdict in VERDICTS:
                m.pool_verdict.labels(name, verdict).set(1 if p.verdict == verdict else 0)
        for band in BANDS:
            m.queue_depth.labels(band).set(self.admission.queue.depth(band))
        health = getattr(self.admission.store, "health", None)
        store: StoreHealth = health() if health is not None else IN_MEMORY
        m.store_up.set(1 if store.up else 0)
        m.store_down_seconds.set(store.down_for_s)
        m.store_pending.labels("settle").set(store.pending_settles)
        m.store_pending.labels("usage").set(store.pending_usage)
        return metrics_page(m.registry)

    def sweep_outliers(self) -> None:
        """One outlier-ejection sweep (`fleet.health.OutlierDetector`), counted and logged."""
        for a in self.outliers.run(self.live):
            if a.eject:
                self.metrics.endpoint_ejections.labels(a.endpoint, a.kind or "").inc()
                log.warning("ejected %s: %s", a.endpoint, a.reason)
            else:
                log.info("%s back in service on probation", a.endpoint)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health.outlier.interval_s)
            try:
                self.sweep_outliers()
            except Exception:  # a bug here must not stop ejections ending
                log.exception("outlier sweep failed")

    def pool_health(self) -> dict[str, PoolHealth]:
        """Every pool's concurrency health now (`fleet.health.pool_health`)."""
        return pool_health(self.live, self.config.health.pools, self.live.clock())

    # -- stages ---------------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> TenantSpec:
        return self.authenticate_key(authorization)[0]

    def authenticate_key(self, authorization: str | None) -> tuple[TenantSpec, str]:
        """The tenant and the key's hash (budgets and rate limits per key use the hash)."""
        if not authorization:
            raise AuthenticationError(
                "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key"
            )
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError("the Authorization header must be 'Bearer <key>'")
        key_hash = hash_key(key.strip())
        tenant = self.tenants.get(key_hash)
        if tenant is None:
            raise AuthenticationError("invalid API key")  # the key itself is never logged
        return tenant, key_hash

    def classify(
        self, api: ApiKind, body: JSONObject, headers: Mapping[str, str], tenant: TenantSpec
    ) -> RequestProfile:
        """The request's profile. For a model alias (tiered model routing) the tier is chosen
        here (`placement.tiers.choose_tier`) and ``body["model"]`` is rewritten to it: the
        front end forwards the rewritten body; the profile names the alias and why."""
        model = body["model"]
        alias = self.aliases.get(model)
        if alias is not None:
            first, _ = self.classifier.classify(
                request_id="", api=api, body=body, headers=headers, tenant=tenant
            )
            choice = choose_tier(
                alias,
                workload_class=first.workload_class,
                tenant=tenant.name,
                prompt_tokens=first.prompt_tokens,
                ttft_slo_s=first.ttft_slo_s,
            )
            body["model"] = model = choice.model
        if model not in self.fleet.models:
            raise ModelNotFoundError(
                f"the model {model!r} does not exist; available: "
                f"{', '.join(sorted([*self.fleet.models, *self.aliases]))}",
                param="model",
            )
        if api not in self.fleet.apis[model]:
            raise InvalidRequestError(self._api_mismatch(model, api), param="model")
        n = body.get("n")
        limit = self.config.gateway.max_n
        if isinstance(n, int) and n > limit:
            raise InvalidRequestError(
                f"'n' must be at most {limit} (gateway.max_n), got {n}", param="n"
            )
        profile, _ = self.classifier.classify(
            request_id=os.urandom(8).hex(), api=api, body=body, headers=headers, tenant=tenant
        )
        if alias is not None:
            profile = profile.with_(model_alias=alias.name, tier_reason=choice.reason)
        return profile

    def _api_mismatch(self, model: str, api: ApiKind) -> str:
        """Why ``model`` is not served through ``api``: its kind (models[].kind: an
        embeddings model, a generation model), else its endpoints' dialect."""
        kinds = {m.kind for m in self.fleet.models[model]}
        path = API_PATHS[api]
        if kinds == {"embed"}:
            return (f"the model {model!r} is an embeddings model: it serves /v1/embeddings, "
                    f"not {path}")
        if api == "embeddings":
            served = " and ".join(p for a, p in API_PATHS.items() if a in self.fleet.apis[model])
            return (f"the model {model!r} is a generation model: it serves {served}, not "
                    f"/v1/embeddings")
        return (f"the model {model!r} is served only through the Anthropic Messages dialect, "
                f"which carries chat completions, not {api}")

    def _check_possible(self, profile: RequestProfile) -> None:
        """A request that no endpoint of the fleet could ever serve is the client's error (400
        naming the limit), not a capacity problem (503)."""
        largest = self.classifier.largest_context.get(profile.model)
        if largest is None:
            return
        out = profile.max_output_tokens if profile.api != "embeddings" else 0
        if profile.prompt_tokens > largest:
            raise InvalidRequestError(
                f"the prompt is {profile.prompt_tokens} tokens; the largest context of model "
                f"{profile.model!r} in this fleet is {largest} tokens",
                param="input" if profile.api == "embeddings" else (
                    "messages" if profile.api == "chat" else "prompt"),
                code="context_length_exceeded",
            )
        if profile.prompt_tokens + out > largest:
            raise InvalidRequestError(
                f"max_tokens {out} plus the prompt's {profile.prompt_tokens} tokens exceed the "
                f"largest context of model {profile.model!r} in this fleet ({largest} tokens); "
                f"ask for at most {largest - profile.prompt_tokens}",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def decide(
        self, profile: RequestProfile, *, record: bool = True, unplaced: Outcome | None = None
    ) -> Decision:
        """Place the request; raise 503 naming the filters when nothing is eligible (and record
        that in the ledger, as ``unplaced`` when given, else as a 503, unless ``record`` is
        false: a retry that will wait and re-place). The error carries the record
        (`GatewayError.recorded`)."""
        policy = self.class_policy[profile.workload_class]
        snap = self.live.snapshot()
        decision = place(
            profile,
            snap,
            policy,
            decision_id=profile.request_id,  # every attempt of one request under one id
            timer=time.perf_counter,
        )
        self.metrics.observe_placement(decision.timings_s)
        if decision.spillover is not None:
            s = decision.spillover
            self.metrics.spillovers.labels(
                profile.workload_class, s.from_region or "", s.to_region, s.kind
            ).inc()
        if decision.picked is None:
            self._check_possible(profile)
            for name, n in decision.removed_by.items():
                self.metrics.no_endpoint.labels(name).inc(n)
            error = self._nothing_eligible(decision, len(snap.endpoints))
            if record:
                outcome = unplaced or Outcome(status=error.status, endpoint=None)
                error.recorded(decision.decision_id,
                               self.ledger.record(decision, outcome, time.time()))
            raise error
        return decision

    def rate_limited(self, model: str) -> dict[str, float]:
        """The endpoints serving ``model`` that are out after a 429 (`fleet.passive`), each
        with the seconds left until its ejection ends."""
        now = self.live.clock()
        out: dict[str, float] = {}
        for name, until in self.outliers.rate_limited().items():
            e = self.fleet.by_name.get(name)
            if e is not None and model in e.models:
                out[name] = max(0.0, until - now)
        return out

    def _nothing_eligible(self, decision: Decision, total: int) -> NoEligibleEndpointError:
        """The 503 naming the filters; when endpoints that serve the model are out after their
        429s, it says when the first is back (``Retry-After``), and it is a 429
        ``upstream_rate_limited`` when every endpoint that serves the model and was filtered
        out is one of them."""
        model = decision.profile.model
        limited = self.rate_limited(model)
        if not limited:
            return NoEligibleEndpointError(total, decision.removed_by)
        wait = min(limited.values())
        by_name = self.fleet.by_name
        others = any(
            c.rejected_by is not None and c.endpoint not in limited
            # .get: a candidate the snapshot had may be gone after a reload since
            and (e := by_name.get(c.endpoint)) is not None and model in e.models
            for c in decision.candidates
        )
        cls = NoEligibleEndpointError if others else EndpointsRateLimitedError
        error = cls(total, decision.removed_by,
                    f"{len(limited)} rate limited after an HTTP 429, the first back in "
                    f"{retry_after_header(wait)['Retry-After']} s")
        error.headers.update(retry_after_header(wait))
        return error

    def _failed(self, message: str, upstream: str, model: str, limited: Endpoint | None,
                limited_for: float | None) -> UpstreamError:
        """The answer when a request's last attempt failed and it goes no further: a 502
        naming the endpoint, or, when that attempt was answered 429, a 429
        ``upstream_rate_limited`` whose ``Retry-After`` says when the first endpoint that
        serves the model is back (the one that answered 429: after its Retry-After)."""
        if limited is None:
            return UpstreamError(message, upstream=upstream)
        waits = self.rate_limited(model)
        wait = min(waits.values()) if waits else (
            limited_for if limited_for is not None else limited.spec.limits.retry_after_s)
        return UpstreamRateLimitedError(message, upstream=upstream,
                                        headers=retry_after_header(wait))

    def reserve(
        self,
        profile: RequestProfile,
        ticket: Ticket | None = None,
        failed: list[str] | None = None,
        *,
        record: bool = True,
        unplaced: Outcome | None = None,
    ) -> Placement:
        """Place the request and reserve the picked endpoint (`decide`, then
        `LiveFleet.reserve`); the admission ticket, if any, is marked placed. With shared slots
        (several replicas), call `hold` instead."""
        trace = current_trace()
        gated = self.admission.gated(profile)
        if gated:
            profile = profile.with_(gated=gated)
        with trace.stage("place"):
            decision = self.decide(profile, record=record, unplaced=unplaced)
            trace.placed(decision)
        view = decision.picked
        assert view is not None
        if self.salts is not None and profile.engine_block_hashes:
            self.salts.note(view.name, profile.cache_salt, profile.engine_block_hashes[0])
        if self.shared is not None:
            self.shared.picked(view.name, profile)
        uncached = decision.candidate(view.name).annotations.get("uncached_tokens")
        prefill_tokens = profile.prompt_tokens if uncached is None else int(uncached)
        unseen = not profile.stream or not self.sees_chunks
        # the predicted first token: when a first token nobody sees counts as arrived, and
        # (under the dispatch gate) when the endpoint's prefill queue is expected to be done
        ttft = (
            self._predicted_ttft_s(decision, view, profile, prefill_tokens)
            if unseen or self.admission.gate_s is not None
            else None
        )
        reservation = self.live.reserve(
            view.name,
            profile.prompt_tokens + profile.max_total_output_tokens,
            prefill_tokens=prefill_tokens,
            ttft_s=ttft,
        )
        if ticket is not None:
            self.admission.placed(ticket)
            if ticket.grant is not None and ticket.grant.prefilling:
                reservation.on_first_token = ticket.grant.prefilled
        if unseen and ttft is not None:
            reservation.prefill_within(ttft)
        return Placement(decision, reservation, [] if failed is None else failed, ticket, trace)

    @staticmethod
    def _predicted_ttft_s(
        decision: Decision, view: EndpointView, profile: RequestProfile, prefill_tokens: int
    ) -> float | None:
        """When a request whose first token this process cannot see (a non-streamed answer
        arrives whole, at its end) stops counting as pending prefill on its endpoint: the
        predicted-latency plugin's TTFT (corrected by the endpoint's observed ÷ predicted ratio,
        the prefill queue ahead included); without it, the roofline's prefill of the queue ahead
        and its own uncached tokens, scaled by that ratio; else the endpoint's observed TTFT
        median; None (at its release) when there is none of these."""
        ttft = decision.candidate(view.name).annotations.get("ttft_s")
        if ttft is not None:
            return float(ttft)
        st = view.state
        r = view.endpoint.roofline(profile.model)
        if r is None:
            return st.ttft_p50_s
        tokens = st.pending_prefill_tokens + prefill_tokens
        return r.prefill_time_s(max(1, tokens)) * (st.ttft_ratio_p50 or 1.0)

    def _session_plugins(self, workload_class: str) -> list[SessionAffinity]:
        policy = self.class_policy.get(workload_class)
        if policy is None:
            return []
        return [o for o in policy.observers if isinstance(o, SessionAffinity)]

    async def recall_session(self, profile: RequestProfile) -> None:
        """With shared placement state: a session this process does not know is looked up in
        Redis (one GET) and its endpoint given to the class's session-affinity plugins, so a
        session placed by another replica continues where it ran. No-op otherwise."""
        key = profile.session_key
        if self.shared is None or key is None:
            return
        plugins = self._session_plugins(profile.workload_class)
        if not plugins or all(p.knows(key) for p in plugins):
            return
        endpoint = await self.shared.session(key)
        if endpoint is not None and endpoint in self.live.live:
            from inferplane.admission.shared_placement import SharedPick

            # learned as the other replica's pick of this session would have been taught (the
            # session plugins remember it through their learn_shared): the session, and its
            # prompt's blocks as held there (this process missed that pick, so
            # without them its cache-aware scoring sees no reason to keep the session in place)
            self.learn_shared(SharedPick(
                endpoint, profile.workload_class, profile.model, profile.cache_salt, key,
                profile.block_hashes, profile.engine_block_hashes,
            ))

    def learn_shared(self, pick: SharedPick) -> None:
        """Another replica's pick: the class's placement plugins learn it as their own
        (``learn_shared``: session and prefix affinity, and the latency prediction's prefix
        index), and the KV-event mirror notes its cache scope. Picks for an endpoint or class
        this process does not have are skipped."""
        policy = self.class_policy.get(pick.workload_class)
        if policy is None or pick.endpoint not in self.live.live:
            return
        if self.salts is not None and pick.engine_block_hashes:
            self.salts.note(pick.endpoint, pick.cache_salt, pick.engine_block_hashes[0])
        snap = self.live.snapshot()
        view = next((v for v in snap.endpoints if v.name == pick.endpoint), None)
        if view is None:
            return
        profile = RequestProfile(
            request_id="", tenant="", model=pick.model, workload_class=pick.workload_class,
            block_hashes=pick.block_hashes, engine_block_hashes=pick.engine_block_hashes,
            cache_salt=pick.cache_salt, session_key=pick.session_key,
        )
        cycle = CycleState(profile, snap, policy.rng)
        for o in policy.observers:
            learn = getattr(o, "learn_shared", None)
            if learn is not None:
                learn(cycle, view)

    def first_byte_timeout(self, decision: Decision) -> float | None:
        """The pick's first-byte timeout (`config.schema.FirstByteTimeoutSpec`): ``factor ×``
        the predicted TTFT (plus the predicted decode of a non-streamed answer, whose first byte
        comes with its last), at least ``floor_s``, at most ``upstream_timeout_s``; None when
        disabled."""
        spec = self.config.gateway.first_byte_timeout
        if not spec.enabled or decision.picked is None:
            return None
        a = decision.candidate(decision.picked.name).annotations
        ttft = a.get("ttft_s")
        if ttft is None:
            t = spec.unpredicted_s
        else:
            p = decision.profile
            if not p.stream:
                ttft += p.max_output_tokens * a.get("itl_s", 0.0)
            t = max(spec.floor_s, spec.factor * ttft)
        return min(t, self.config.gateway.upstream_timeout_s)

    def attempt_failed(self, endpoint: str, reason: str, status: int | None = None) -> None:
        """An attempt on ``endpoint`` failed before its first byte (``reason`` and upstream
        ``status`` as in `UpstreamAttemptFailed`): count it, and eject the endpoint at once when
        its consecutive failures reach the threshold (`fleet.health.OutlierDetector.
        note_failure`). A 429 is the upstream's rate limit, not a fault: it enters the
        error-rate window only (`fleet.passive` ejects for its Retry-After)."""
        self.metrics.upstream_failures.labels(endpoint, reason).inc()
        throttled = status == 429
        self.live.observe_outcome(
            endpoint, False, timeout=reason == "first_byte_timeout", consecutive=not throttled
        )
        if not throttled:
            self._eject_if_failing(endpoint)

    def _eject_if_failing(self, endpoint: str) -> None:
        a = self.outliers.note_failure(self.live, endpoint)
        if a is not None:
            self.metrics.endpoint_ejections.labels(a.endpoint, a.kind or "").inc()
            log.warning("ejected %s: %s", a.endpoint, a.reason)

    async def hold(
        self,
        profile: RequestProfile,
        ticket: Ticket | None = None,
        failed: list[str] | None = None,
        unplaced: Outcome | None = None,
    ) -> Placement:
        """`reserve`, and with shared slots (`admission.slots`) also take the pick's slot
        across replicas: a pick at ``max_concurrency`` fleet-wide is excluded (filter
        ``capacity``) and the request re-placed; when every eligible endpoint is full it waits
        for a slot, at most its class's queue deadline (then 503 ``queue_timeout``).
        ``unplaced``: what to record when nothing is eligible (`decide`)."""
        placement = self.reserve(profile, ticket, failed, unplaced=unplaced)
        slots = self.slots
        if slots is None:
            return placement
        full: set[str] = set()
        removed: dict[str, int] = {}
        deadline: float | None = None
        while True:
            name = placement.endpoint_name
            try:
                sid = await slots.acquire(name)
            except BaseException:  # cancelled: the local reservation must not leak
                placement.reservation.release()
                raise
            if sid is not None:
                placement.reservation.on_release = functools.partial(slots.release, name, sid)
                return placement
            placement.reservation.release()
            full.add(name)
            try:
                placement = self.reserve(
                    profile.with_(full=frozenset(full)), ticket, failed, record=False
                )
                continue
            except NoEligibleEndpointError as exc:
                removed = exc.removed
            now = self.live.clock()
            if deadline is None:
                cls = self.admission.classes.get(profile.workload_class)
                wait_ms = (cls.queue_deadline_ms if cls else None) or (
                    self.config.admission.queue.default_deadline_ms
                )
                deadline = now + wait_ms / 1000.0
            if now >= deadline:
                timeout = QueueTimeoutError(
                    f"every endpoint that can serve {profile.model!r} stayed at its "
                    f"max_concurrency across the gateway replicas until the queue deadline",
                    headers={"Retry-After": "1"},
                )
                # the answer's record says 503 (after a failed attempt the id's last record
                # would otherwise be that attempt's 502), with the capacity filter as evidence
                receipt = self.record_unplaced(
                    profile, status=503, error=timeout.message, failed=failed or (),
                    removed_by=removed,
                )
                raise timeout.recorded(profile.request_id, receipt)
            await slots.wait_free(min(0.1, deadline - now))
            full.clear()
            placement = self.reserve(profile, ticket, failed, unplaced=unplaced)

    async def open_with(
        self,
        profile: RequestProfile,
        send: Callable[[Endpoint, float | None], Awaitable[R]],
        ticket: Ticket | None = None,
        *,
        gather: bool = False,
    ) -> Attempt[R]:
        """Place, reserve and ``send`` to the pick with its first-byte timeout
        (`first_byte_timeout`), re-placing after a failure before the first byte (``send``
        raises `UpstreamAttemptFailed`) while eligible endpoints remain, at most
        ``gateway.max_replacements`` times, each drawing on the retry budget
        (`admission.retry.RetryBudget`); a re-placement avoids the failed endpoints and, where
        it can, their failure domains and zones (the ``failure-domain`` filter). With
        ``gateway.send_bursts_together`` and ``gather`` (the HTTP gateway's requests; not the
        batch lane's nor the simulator's), a request placed on an engine that batches
        (`Endpoint.joins_steps`: not a provider API), whatever its priority, waits at
        `turn_gate` for the rest of its burst to be placed before it is sent
        (`dispatch.turns`)."""
        failed: list[str] = []
        await self.recall_session(profile)
        self.admission.retry_budget.record_request()
        last_error = ""
        rate_limited: Endpoint | None = None  # the endpoint that answered 429 last attempt
        limited_for: float | None = None  # and the Retry-After it sent
        while True:
            # after a failure, nothing left to re-place on is the failure's 502 (429 after a
            # 429, `_failed`): its record says so (what the client gets), with the
            # re-placement's filters as evidence
            nowhere = None if not failed else self._failed(
                f"{last_error}; no other eligible endpoint to re-place on", failed[-1],
                profile.model, rate_limited, limited_for,
            )
            unplaced = None if nowhere is None else Outcome(
                status=nowhere.status, endpoint=None, error=nowhere.message,
                attempts=len(failed), failed_endpoints=tuple(failed),
            )
            try:
                placement = await self.hold(profile, ticket, failed, unplaced)
            except NoEligibleEndpointError as exc:
                if nowhere is None:
                    raise
                if exc.receipt is not None and exc.decision_id is not None:
                    nowhere.recorded(exc.decision_id, exc.receipt)
                raise nowhere from None
            if rate_limited is not None:
                self._rate_limited_spillover(placement, rate_limited)
            decision, reservation = placement.decision, placement.reservation
            view = decision.picked
            assert view is not None
            trace = placement.trace
            try:
                if (
                    gather
                    and self.config.gateway.send_bursts_together
                    and view.endpoint.joins_steps
                ):
                    # the rest of a burst is placed before this one goes out (dispatch.turns)
                    await self.turn_gate.wait()
                trace.upstream_started(view.endpoint, profile.model)
                resp = await send(view.endpoint, self.first_byte_timeout(decision))
            except UpstreamAttemptFailed as exc:
                reservation.release()
                trace.upstream_failed(exc.reason, exc.upstream_status)
                self.attempt_failed(view.name, exc.reason, exc.upstream_status)
                ejected = self.passive.failed(
                    view.endpoint,
                    reason=exc.reason,
                    status=exc.upstream_status,
                    retry_after_s=exc.retry_after_s,
                )
                if ejected is not None:
                    self.metrics.endpoint_ejections.labels(view.name, ejected.kind or "").inc()
                    log.warning("ejected %s: %s", view.name, ejected.reason)
                rate_limited = view.endpoint if exc.upstream_status == 429 else None
                limited_for = exc.retry_after_s
                failed.append(view.name)
                self.failure_log.warn(
                    view.name, "upstream %s failed before its first byte (%s): %s "
                    "[decision %s, attempt %d]", view.name, exc.reason,
                    exc.message.split(": ", 1)[-1], decision.decision_id, len(failed),
                )
                last_error = exc.message.split(": ", 1)[-1]
                over = len(failed) > self.config.gateway.max_replacements
                if not over and not self.admission.retry_budget.try_acquire():
                    self.metrics.replacement_budget_exhausted.inc()
                    last_error += " (re-placement refused: the gateway's retry budget is spent)"
                    over = True
                final = None if not over else self._failed(
                    f"{last_error}"
                    + (f" (also failed: {', '.join(failed[:-1])})" if len(failed) > 1 else ""),
                    view.name, profile.model, rate_limited, limited_for,
                )
                receipt = self.ledger.record(
                    decision,
                    Outcome(
                        status=502 if final is None else final.status,
                        endpoint=view.name,
                        # the last attempt's record says what the client got
                        error=exc.message if final is None else final.message,
                        attempts=len(failed),
                        failed_endpoints=tuple(failed),
                    ),
                    time.time(),
                )
                if final is not None:
                    raise final.recorded(decision.decision_id, receipt) from None
                self.metrics.replacements.inc()
                profile = profile.with_(
                    excluded=profile.excluded | {view.name},
                    attempt=profile.attempt + 1,
                    avoid_domains=profile.avoid_domains | _domains(view.endpoint),
                )
                continue
            except BaseException as exc:
                reservation.release()
                trace.upstream_failed(type(exc).__name__)
                # the client went away (or the gateway failed) before the upstream answered:
                # the request still gets its record (issue 12 item 11)
                gone = isinstance(exc, asyncio.CancelledError)
                self.ledger.record(
                    decision,
                    Outcome(
                        status=499 if gone else 500,
                        endpoint=view.name,
                        error="client disconnected before the upstream answered" if gone
                        else f"gateway error: {type(exc).__name__}",
                        attempts=len(failed) + 1,
                        failed_endpoints=tuple(failed),
                    ),
                    time.time(),
                )
                raise
            return Attempt(decision, reservation, failed, ticket, trace, response=resp)

    def _rate_limited_spillover(self, placement: Placement, limited: Endpoint) -> None:
        """The request moves on because ``limited`` answered 429: a spillover, reason
        ``rate_limited``, from it to the new pick (recorded in the decision and counted)."""
        d = placement.decision
        assert d.picked is not None
        chosen = d.picked.endpoint
        if d.spillover is None:
            self.metrics.spillovers.labels(
                d.profile.workload_class, limited.region, chosen.region, "rate_limited"
            ).inc()
        placement.decision = replace(
            d,
            spillover=Spillover(
                reason=f"{limited.name} answered HTTP 429 (rate limited)",
                preferred=limited.name,
                chosen=chosen.name,
                from_region=limited.region,
                to_region=chosen.region,
                kind="rate_limited",
                delta_rtt_s=self.fleet.rtt_s(d.profile.client_region or limited.region,
                                             chosen.region)
                - self.fleet.rtt_s(d.profile.client_region or limited.region, limited.region),
            ),
        )

    async def read_with(
        self, placement: Placement, started: float, read: Callable[[], Awaitable[bytes]]
    ) -> tuple[bytes, float]:
        """Read a non-streamed answer whole with ``read``; return it and when it was in (the
        E2E end).

        A non-streamed answer has no observable first token: its TTFT is not recorded (only
        E2E), so it cannot skew the latency correction or outlier ejection; its prefill stopped
        counting as pending on the endpoint once its predicted TTFT had passed since `reserve`.
        A failed read (`UpstreamError`) is accounted here and re-raised; otherwise the caller calls
        `account_body` (the HTTP surface does so once the answer is on its way to the client).
        """
        try:
            data = await read()
        except UpstreamError as exc:
            receipt = self.account(placement, status=502, started=started, stats=None,
                                   usage=None, error=exc.message)
            exc.recorded(placement.decision.decision_id, receipt)
            raise
        except BaseException:
            self.account(placement, status=499, started=started, stats=None, usage=None,
                         error="cancelled")
            raise
        return data, time.perf_counter()

    def account_body(
        self, placement: Placement, data: bytes, *, status: int, started: float, ended: float
    ) -> Receipt:
        """Account a non-streamed answer (read by `read_with`) from its status and body."""
        return self.account(
            placement,
            status=status,
            started=started,
            stats=None,
            usage=parse_usage(data, sse=False) if status == 200 else None,
            ended=ended,
        )

    def account(
        self,
        attempt: Placement,
        *,
        status: int,
        started: float,
        stats: StreamStats | None,
        usage: Mapping[str, Any] | None,
        error: str | None = None,
        ended: float | None = None,
        blame: bool = True,
    ) -> Receipt:
        """Release capacity, feed observations back, write the ledger record and return its
        receipt. ``ended`` is when the request's answer was complete (its E2E end), now when
        not given. With ``blame`` false the outcome is unknown (nobody saw the response):
        recorded, but not in the endpoint's error rate nor its passive health."""
        d = attempt.decision
        name = attempt.endpoint_name
        live_w, inflight = self.live.power_now(name)  # before this request's slot is freed
        if attempt.reservation.released:  # released already (the epp, at the exchange's end)
            inflight += 1
        attempt.reservation.release()
        self.admission.queue.pump()  # a slot is free: the best waiter may go
        now = time.perf_counter() if ended is None else ended
        ok = status < 500 and error is None
        if status == 502 and error is not None:  # the answer broke after its first byte
            self.failure_log.warn(name, "upstream %s failed after its first byte: %s "
                                  "[decision %s]", name, error.split(": ", 1)[-1], d.decision_id)
        if blame:
            # a client that went away says nothing about the endpoint: not a consecutive
            # failure
            self.live.observe_outcome(name, ok, consecutive=status != 499,
                                      served=ok and 200 <= status < 300)
            if ok:
                self.passive.succeeded(name)
            elif status != 499:
                self._eject_if_failing(name)
        ttft = itl = None
        if stats is not None and stats.first_byte is not None:
            ttft = stats.first_byte - started
            predicted = d.candidate(name).annotations.get("ttft_raw_s")
            self.live.observe_ttft(name, ttft, predicted)
            self.metrics.child(self.metrics.ttft, name).observe(ttft)
            self.live.observe_itls(name, stats.gaps)
            if stats.gaps:
                itl = sum(stats.gaps) / len(stats.gaps)
        prompt = completion = cached = None
        source: str | None = None
        if usage:
            prompt = _int(usage.get("prompt_tokens"))
            completion = _int(usage.get("completion_tokens"))
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict):
                cached = _int(details.get("cached_tokens"))
            source = "upstream"
        if completion is None and stats is not None and stats.tokens:
            # no usage arrived (the client left mid-stream, or the engine sent none): bill the
            # tokens generated and relayed, counted from the stream
            completion, source = stats.tokens, "counted"
        e2e = now - started
        ep = d.picked.endpoint if d.picked is not None else None
        cost = None
        if ep is not None:
            cost = request_cost_usd(
                ep.cost,
                prompt_tokens=prompt if prompt is not None else d.profile.prompt_tokens,
                completion_tokens=completion or 0,
                cached_tokens=cached or 0,
                seconds=e2e,
                max_concurrency=ep.max_concurrency,
            )
        energy = power = None
        if ep is not None and (drawn := endpoint_power_w(ep, live_w)) is not None:
            energy, power = request_energy_j(drawn[0], e2e, inflight), drawn[1]
        if attempt.ticket is not None:
            attempt.ticket.observe(
                cost or 0.0,
                prompt if prompt is not None else d.profile.prompt_tokens,
                completion or 0,
            )
            attempt.ticket.succeeded = 200 <= status < 300  # else a re-send is a retry
        self.metrics.child(self.metrics.requests, d.profile.api, name, str(status)).inc()
        attempt.trace.finished(
            status=status, error=error, prompt_tokens=prompt, completion_tokens=completion,
            ttft_s=ttft, tpot_s=itl,
        )
        return self.ledger.record(
            d,
            Outcome(
                status=status,
                endpoint=name,
                ttft_s=ttft,
                itl_s=itl,
                e2e_s=e2e,
                prompt_tokens=prompt,
                completion_tokens=completion,
                cached_tokens=cached,
                cost_usd=cost,
                attempts=len(attempt.failed) + 1,
                failed_endpoints=tuple(attempt.failed),
                error=error,
                usage_source=source,
                energy_j=energy,
                power_source=power,
            ),
            time.time(),
        )

    def record_unplaced(
        self,
        profile: RequestProfile,
        *,
        status: int,
        error: str,
        failed: Sequence[str] = (),
        removed_by: Mapping[str, int] | None = None,
    ) -> Receipt:
        """The record of a request that ended without a pick (its client left while it waited
        for admission; every eligible endpoint stayed full until its queue deadline): no
        candidates, no pick, the status and the reason; ``failed``: the endpoints earlier
        attempts failed on, ``removed_by``: the last placement's filters."""
        decision = Decision(
            decision_id=profile.request_id,
            policy=self.class_policy[profile.workload_class].name,
            profile=profile,
            candidates=(),
            picked=None,
            removed_by=dict(removed_by or {}),
        )
        outcome = Outcome(status=status, endpoint=None, error=error)
        if failed:
            outcome = replace(outcome, attempts=len(failed), failed_endpoints=tuple(failed))
        return self.ledger.record(decision, outcome, time.time())

    async def committed(self, receipt: Receipt, ticket: Ticket | None = None) -> bool:
        """Wait (``ledger.durable``) until ``receipt``'s record is committed, and until the
        admission ``ticket``'s settle and usage are written, each at most
        ``ledger.commit_timeout_s``; False (and counted) when a wait ran out or a write
        failed, and at once while the ledger's store is down. Front ends call it before an
        answer completes."""
        spec = self.config.ledger
        if ticket is not None:  # started first: its store write runs while the ledger commits
            self.admission.finish_soon(ticket)
        ok = True
        if spec.durable and not receipt.committed:
            # while the ledger's store is known down (its last write failed, none committed
            # since) an answer does not wait: it would wait commit_timeout_s every time
            ok = False if self.ledger.store_down else await receipt.durable(
                spec.commit_timeout_s)
            if not ok:
                self.metrics.ledger_commit_timeouts.inc()
        if ticket is not None:
            ok = await self.admission.settled(ticket, spec.commit_timeout_s) and ok
        return ok

    async def error_committed(self, exc: GatewayError) -> None:
        """`committed` for a failed request's answer: waits for the record ``exc`` carries,
        where it has one (`GatewayError.recorded`), before the error answer leaves."""
        if isinstance(exc.receipt, Receipt):
            await self.committed(exc.receipt)


@dataclass(frozen=True, slots=True)
class Reloaded:
    """What a fleet reload changed (`Core.reload`)."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    policies_rebuilt: bool
    seconds: float
    draining: int  # this process's requests in flight on the removed endpoints at the swap


def _domains(endpoint: Endpoint) -> frozenset[str]:
    """The failure domain and zone of an endpoint, as ``profile.avoid_domains`` holds them."""
    sub = endpoint.substrate
    out = set()
    if sub.failure_domain:
        out.add("fd:" + sub.failure_domain)
    if sub.zone:
        out.add("zone:" + sub.zone)
    return frozenset(out)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _log_tenant_changes(old: FleetConfig, new: FleetConfig) -> None:
    """One line when a reload adds, removes or changes tenants, naming those whose budgets
    changed (a budget in force changes what every replica admits against one shared counter;
    replicas on different files enforce different limits)."""
    before = {t.name: t for t in old.tenants}
    after = {t.name: t for t in new.tenants}
    added = [n for n in after if n not in before]
    removed = [n for n in before if n not in after]
    changed = [n for n in after if n in before and after[n] != before[n]]
    if not (added or removed or changed):
        return
    budgets = [n for n in changed if after[n].budgets != before[n].budgets]
    log.info(
        "tenants reloaded: added %s; removed %s; changed %s; budgets changed %s",
        added or "none", removed or "none", changed or "none", budgets or "none",
    )
