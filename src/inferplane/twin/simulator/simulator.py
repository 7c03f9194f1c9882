"""The offline simulator: replay a trace through the gateway's own pipeline on a virtual clock.

Every arrival runs the stages of `inferplane.core.Core`, the same object the HTTP gateway
subclasses, on a `VirtualTimeLoop` (an asyncio loop whose clock jumps to its next timer): the
request is classified from a traffic mix into a `RequestProfile`, **admitted** by the real
`Admission` (token ceilings, rate limits, budgets, the priority queue with its bands, fair share,
deadlines and load shedding), batch traffic waits in the **batch lane** for spare capacity
(`Admission.batch_spare`, the batch worker's test), then ``Core.open_with`` **places** it with the
same ``place()`` and `Policy`, reserves the pick and sends it, **re-placing** after a failure
before the first byte within ``gateway.max_replacements`` and the retry budget, and
``Core.account`` settles it. Each endpoint is an emulated vLLM `Engine` timed by its roofline.

Virtual seconds; the loop runs callbacks in time order:

- **arrival** (trace time / ``rate_scale``): one task per request runs the stages above.
- **send**: what the dispatcher would meet before the first byte: a ``down`` endpoint refuses the
  connection, a ``hung`` one times out after the first-byte timeout, a ``429`` fault or a
  provider's ``rate_limit_rpm`` answers 429 — each an `UpstreamAttemptFailed`, re-placed by the
  core. Otherwise the request reaches the engine half its network RTT later.
- **step completion**: finished requests reach the gateway after the return half of the RTT and
  are accounted; the engine publishes its gauges (its ``/metrics`` as of this step boundary) and
  starts its next step with ``step_many``, which fast-forwards steady decode up to the next
  moment a request could reach it (`Simulator._horizon`).
- **scrape**: every ``gateway.scrape_interval_s`` the published gauges of every reachable engine
  are copied into `LiveFleet`; a ``down`` or ``hung`` endpoint's metrics age until stale, and the
  next ``/health`` probe marks it unhealthy (unless the gateway would skip that turn: a 2xx
  answer within ``gateway.health_skip_window_s``, after the last failed scrape, and no failed
  request since, `Simulator._probe_down`). Outlier sweeps run every ``health.outlier.interval_s``
  when enabled.
- **faults** (``--faults``, `faults`): scheduled ``down`` / ``hung`` / ``429`` / ``up`` events.

Fidelity notes. Network delay is the hardware's ``network_rtt_s`` (provider APIs) plus the RTT
between the client's region and the endpoint's. The gateway adds a request's inter-token gaps
to its ITL window when the request ends; the simulator adds them when the engine emits them
(grouped per step, which avoids per-token work). No KV events reach the simulated gateway (the
prefix index is learned from routing). An endpoint serving several models runs one engine timed
by its first model that fits. Admission uses an in-process store (never a file or Redis).
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

from inferplane.admission.controller import Ticket
from inferplane.admission.queue import PoolKey
from inferplane.admission.state import MemoryStore
from inferplane.config.loader import load_config
from inferplane.config.schema import FleetConfig, MixEntry, TenantSpec
from inferplane.core.plane import Core, Placement
from inferplane.dispatch.answer import StreamStats, UpstreamAttemptFailed
from inferplane.errors import GatewayError, NoEligibleEndpointError, UpstreamError
from inferplane.fleet.model import Endpoint
from inferplane.fleet.pricing import request_cost_usd
from inferplane.fleet.scraper import serving_vouches, skip_window
from inferplane.ledger.memory import MemoryLedger
from inferplane.placement.build import build_policies
from inferplane.placement.framework import Policy
from inferplane.placement.profile import RequestProfile
from inferplane.twin.engine.model import EngineRequest
from inferplane.twin.simulator.faults import FaultEvent, load_faults
from inferplane.twin.simulator.fleet import (
    SYNTHETIC_ID_BASE,
    SimEndpoint,
    TracePromptTokens,
    engine_block_hashes,
    padded_ids,
    placement_block_hashes,
    seed_of,
)
from inferplane.twin.simulator.mix import SimulationError, TrafficShare, load_mix, resolve_mix
from inferplane.twin.simulator.records import RequestRecord
from inferplane.twin.simulator.report import build_report
from inferplane.twin.simulator.vloop import VirtualTimeLoop
from inferplane.twin.traces.loader import TraceRequest, load_trace, slice_trace
from inferplane.types import ApiKind

__all__ = [
    "RequestRecord",
    "SimulationError",
    "Simulator",
    "TrafficShare",
    "load_mix",
    "resolve_mix",
    "run_simulation",
    "simulate",
]

_EPOCH = 1_800_000_000.0  # the virtual wall clock's Unix time at virtual second 0 (2027-01-15)


# -- the simulator ------------------------------------------------------------------------------
@dataclass(slots=True)
class _Totals:
    itl_gaps: Counter[float] = field(default_factory=Counter)
    end_s: float = 0.0


class _TurnedAway(Exception):
    """The engine cannot take the request (no physics model, larger than its KV cache)."""


class _MidStreamFailure(Exception):
    """The endpoint went down (or hung) while the request was streaming from it."""


class Simulator:
    """One replay of ``trace`` (already sliced and scaled) through ``policy`` on ``config``.

    ``admission`` runs the admission stage (queues, priority bands, fair share, shedding,
    budgets, rate limits) and the batch lane; without it every request goes straight to
    placement, as the baselines do. ``faults`` are scheduled endpoint failures. ``assign`` gives
    the traffic share of every trace request explicitly (else drawn from ``shares`` by fraction).
    """

    def __init__(
        self,
        config: FleetConfig,
        policy: Policy,
        trace: Sequence[TraceRequest],
        shares: Sequence[TrafficShare],
        *,
        seed: int = 0,
        admission: bool | None = None,
        faults: Sequence[FaultEvent] = (),
        assign: Sequence[TrafficShare] | None = None,
        file: str = "<config>",
    ) -> None:
        if not shares and assign is None:
            raise SimulationError("the traffic mix is empty")
        if assign is not None and len(assign) != len(trace):
            raise SimulationError("assign needs one traffic share per trace request")
        self.config = config
        self.policy = policy
        self.loop = VirtualTimeLoop()
        g = config.gateway
        self.core = Core(
            config,
            file,
            ledger=MemoryLedger(),
            admission_store=MemoryStore(),
            clock=self._wall_clock,
            monotonic=self.loop.time,
        )
        # No KV events reach a simulated gateway: placement learns prefixes from its routing.
        self.core.live.prefix_index = None
        self.core.prefix_index, self.core.kv_events = None, None
        self.core.class_policy = {c.name: policy for c in config.classes}
        self.admission = self.core.admission
        self.admission.enabled = config.admission.enabled if admission is None else admission
        self.admission.tick_while_idle = True  # bit-identical results (see Admission._tick)
        self.live = self.core.live
        self.fleet = self.core.fleet
        self.lane_on = self.admission.enabled and config.batch.enabled
        # the per-attempt first-byte timeout comes from Core.open_with (derived from the
        # prediction); this is what a request already in flight on a hung endpoint waits
        fb = g.first_byte_timeout
        self.first_byte_timeout_s = float(fb.floor_s if fb.enabled else g.upstream_timeout_s)
        self.faults = list(faults)
        self.faults_applied = 0  # a fault after the run's last event is never applied
        self.scrape_interval_s = g.scrape_interval_s
        self.block_chars = g.prefix_block_chars
        self.endpoints = [SimEndpoint(e, i) for i, e in enumerate(self.fleet.endpoints)]
        self.by_name = {se.name: se for se in self.endpoints}
        # endpoint -> the virtual time its last scrape failed (down or hung): answers before it
        # skip no probe turn (`_probe_down`)
        self._scrape_failed_at: dict[str, float] = {}
        self._itl_windows = [self.live.live[se.name].itl.add_many for se in self.endpoints]
        self.totals = _Totals()
        self._next_arrival = math.inf
        self._ai = 0
        self._open = 0  # requests not yet over
        self._all_done: asyncio.Future[None] | None = None
        self._dispatch_handles: dict[int, asyncio.TimerHandle] = {}
        self._attempts: dict[int, Placement] = {}
        self._done: dict[int, asyncio.Future[None]] = {}
        self._lane: deque[tuple[PoolKey, asyncio.Future[None]]] = deque()
        self._lane_launching: dict[PoolKey, int] = {}
        self._lane_inflight = 0
        self._lane_ticking = False
        self._hung_until: list[float] = []  # heap: when attempts on hung endpoints time out
        rng = random.Random(seed)
        weights = [s.fraction for s in shares]
        next_id = SYNTHETIC_ID_BASE
        self.records: list[RequestRecord] = []
        for i, tr in enumerate(trace):
            if assign is not None:
                share = assign[i]
            else:
                share = shares[0] if len(shares) == 1 else rng.choices(shares, weights)[0]
            prompt = max(1, tr.input_tokens)
            ids, next_id = padded_ids(tr.hash_ids, prompt, next_id)
            # An embedding is one engine step (prefill, one "token"), and no output tokens.
            out = 1 if share.api == "embeddings" else max(1, tr.output_tokens)
            self.records.append(RequestRecord(i, f"r{i}", tr.arrival_s, prompt, out, share, ids))
        all_shares = list(shares) + list(assign or ())
        self._model_seeds = {s.model: seed_of(s.model) for s in all_shares}
        self._tenants = {t.name: t for t in config.tenants}
        for s in all_shares:  # the mix's unconfigured ``default`` tenant
            if s.tenant not in self._tenants:
                key = "sha256:" + sha256(s.tenant.encode()).hexdigest()
                self._tenants[s.tenant] = TenantSpec(name=s.tenant, api_keys=[key])
        self._key_hashes = {name: t.api_keys[0] for name, t in self._tenants.items()}
        for se in self.endpoints:
            se.publish()
            m = se.metrics()
            if m is not None:
                self.live.update_metrics(se.name, m)

    def _wall_clock(self) -> float:
        return _EPOCH + self.loop.time()

    @property
    def now(self) -> float:
        return self.loop.time()

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> list[RequestRecord]:
        """Run to the last completion; returns every record (also in ``self.records``)."""
        self.loop.run(self._main())
        return self.records

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        recs = self.records
        self._open = len(recs)
        if not recs:
            return
        self._all_done = loop.create_future()
        first_tick = math.floor(recs[0].arrival_s / self.scrape_interval_s)
        loop.call_at(recs[0].arrival_s, self._scrape_tick, first_tick)
        loop.call_at(recs[0].arrival_s, self._arrive, recs[0])
        t0 = recs[0].arrival_s
        for ev in self.faults:
            loop.call_at(t0 + ev.at, self._fault, ev)
        self._next_arrival = recs[0].arrival_s
        health = self.config.health.outlier
        sweeper = loop.create_task(self._sweeps(health.interval_s)) if health.enabled else None
        if self.admission.enabled:
            await self.admission.start()
        try:
            await self._all_done
        finally:
            if sweeper is not None:
                sweeper.cancel()
            await self.admission.close()
        self.totals.end_s = self.now

    async def _sweeps(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            self.core.sweep_outliers()

    def _scrape_tick(self, tick: int) -> None:
        """The scraper: every ``gateway.scrape_interval_s`` while any request is open."""
        self._scrape()
        if self._open > 0:
            self.loop.call_at((tick + 1) * self.scrape_interval_s, self._scrape_tick, tick + 1)

    def _scrape(self) -> None:
        for se in self.endpoints:
            if se.fault in ("down", "hung"):
                # the scrape fails: the endpoint's metrics age until they are stale
                if se.endpoint.scrape_metrics:
                    self._scrape_failed_at[se.name] = self.now
                continue
            m = se.metrics()
            if m is not None:
                self.live.update_metrics(se.name, m)

    def _profile(self, rec: RequestRecord) -> RequestProfile:
        s, cls = rec.share, rec.share.workload_class
        return RequestProfile(
            request_id=rec.request_id,
            tenant=s.tenant,
            model=s.model,
            workload_class=cls.name,
            priority=cls.priority,
            prompt_tokens=rec.prompt_tokens,
            api=s.api,
            max_output_tokens=0 if s.api == "embeddings" else rec.output_tokens,
            block_hashes=placement_block_hashes(
                self._model_seeds[s.model], rec.ids, rec.prompt_tokens, self.block_chars
            ),
            ttft_slo_s=None if cls.ttft_slo_ms is None else cls.ttft_slo_ms / 1000.0,
            itl_slo_s=None if cls.itl_slo_ms is None else cls.itl_slo_ms / 1000.0,
            allowed_jurisdictions=s.allowed_jurisdictions,
            allowed_kinds=frozenset(cls.allowed_kinds) if cls.allowed_kinds else None,
            allow_burst=cls.allow_burst,
            energy_aware=cls.energy_aware,
            client_region=s.region,
            stream=True,
        )

    def _arrive(self, rec: RequestRecord) -> None:
        """One arrival; it schedules the next (so arrivals at one instant keep trace order)."""
        self._ai += 1
        recs = self.records
        if self._ai < len(recs):
            nxt = recs[self._ai]
            self._next_arrival = nxt.arrival_s
            self.loop.call_at(nxt.arrival_s, self._arrive, nxt)
        else:
            self._next_arrival = math.inf
        self.loop.create_task(self._request(rec))

    def _over(self) -> None:
        self._open -= 1
        if self._open == 0 and self._all_done is not None and not self._all_done.done():
            self._all_done.set_result(None)

    # -- one request: the gateway's stages ----------------------------------------------------
    async def _request(self, rec: RequestRecord) -> None:
        try:
            await self._pipeline(rec)
        except Exception as exc:  # a bug: end the run with it rather than lose the request
            if self._all_done is not None and not self._all_done.done():
                self._all_done.set_exception(exc)
            raise
        finally:
            self._over()
            if self._lane:
                self._lane_pump()

    async def _pipeline(self, rec: RequestRecord) -> None:
        profile = self._profile(rec)
        if not (self.lane_on and rec.share.workload_class.priority == "batch"):
            await self._admitted(rec, profile, None)
            return
        pool = self.admission.pool_of(profile)
        await self._lane_wait(rec, pool)
        try:
            await self._admitted(rec, profile, pool)
        finally:
            self._lane_inflight -= 1

    async def _admitted(
        self, rec: RequestRecord, profile: RequestProfile, lane_pool: PoolKey | None
    ) -> None:
        """Admission, then `_serve`; ``lane_pool``: a batch-lane request, counted as launching
        on its pool until it is placed (or refused)."""
        adm = self.admission
        launching = [lane_pool is not None]

        def launched() -> None:
            if launching[0]:
                launching[0] = False
                self._lane_launching[lane_pool] -= 1

        tenant = self._tenants[rec.share.tenant]
        api: ApiKind = "embeddings" if rec.share.api == "embeddings" else "chat"
        body: dict[str, Any] = {"model": profile.model}
        if api != "embeddings":
            body["max_tokens"] = rec.output_tokens
        try:
            ticket = await adm.admit(
                api,
                body,
                rec.request_id.encode(),
                {},
                tenant,
                self._key_hashes[tenant.name],
                profile,
            )
        except GatewayError as exc:
            launched()
            self._refused(rec, exc)
            return
        if ticket.grant is not None:
            rec.queued_s = ticket.grant.waited_s
        try:
            await self._serve(rec, ticket, launched)
        finally:
            launched()
            await adm.finish(ticket)

    def _refused(self, rec: RequestRecord, exc: GatewayError) -> None:
        rec.status, rec.error_code = exc.status, exc.code or exc.error_type
        rec.rejected_by = (f"admission: {rec.error_code}",)

    async def _serve(
        self, rec: RequestRecord, ticket: Ticket, launched: Callable[[], None]
    ) -> None:
        core = self.core
        profile = ticket.profile
        if profile.max_output_tokens and profile.max_output_tokens < rec.output_tokens:
            rec.output_tokens = profile.max_output_tokens  # clamped by a token ceiling
        try:
            attempt = await core.open_with(
                profile, lambda ep, first_byte_s: self._send(rec, ep, first_byte_s), ticket
            )
        except NoEligibleEndpointError as exc:
            rec.status, rec.error_code = exc.status, exc.code
            rec.rejected_by = tuple(n for n, k in exc.removed.items() if k) or ("no-endpoints",)
            return
        except _TurnedAway as exc:
            rec.status, rec.error_code = 400, "engine"
            rec.rejected_by = (str(exc),)
            return
        except UpstreamError as exc:
            rec.status, rec.error_code, rec.failed = exc.status, exc.code or exc.error_type, True
            return
        except GatewayError as exc:  # impossible for this fleet (400 context_length_exceeded)
            rec.status, rec.error_code = exc.status, exc.code or exc.error_type
            rec.rejected_by = (rec.error_code,)
            return
        finally:
            launched()
        d = attempt.decision
        assert d.picked is not None
        ep = d.picked.endpoint
        rec.endpoint, rec.substrate, rec.jurisdiction = ep.name, ep.substrate.name, ep.jurisdiction
        rec.spillover = d.spillover is not None
        rec.predicted_ttft_s = d.candidate(ep.name).annotations.get("ttft_raw_s")
        rec.reservation = attempt.reservation
        done = self._done[rec.index]
        try:
            await done
        except _MidStreamFailure as exc:
            rec.status, rec.error_code, rec.failed = 502, "upstream_error", True
            core.account(attempt, status=502, started=rec.arrival_s, stats=None, usage=None,
                         error=str(exc), ended=self.now)
            return
        except _TurnedAway as exc:  # the engine answers 400: relayed, not retried
            rec.status, rec.error_code = 400, "engine"
            rec.rejected_by = (str(exc),)
            core.account(attempt, status=400, started=rec.arrival_s, stats=None, usage=None,
                         ended=self.now)
            return
        finally:
            del self._done[rec.index]
        self._account(rec, attempt)

    async def _send(
        self, rec: RequestRecord, ep: Endpoint, first_byte_s: float | None = None
    ) -> SimEndpoint:
        """One attempt on ``ep``: what the dispatcher would see of it before the first byte
        (a hung endpoint: the attempt's first-byte timeout, else the upstream timeout)."""
        rec.attempts += 1
        se = self.by_name[ep.name]
        name = ep.name
        if se.fault == "down":
            raise UpstreamAttemptFailed(
                "cannot connect (Connection refused)", upstream=name, reason="connect"
            )
        if se.fault == "hung":
            hang = self.config.gateway.upstream_timeout_s if first_byte_s is None else first_byte_s
            t = self.now + hang
            heapq.heappush(self._hung_until, t)
            try:
                await asyncio.sleep(hang)
            finally:
                self._hung_until.remove(t)
                heapq.heapify(self._hung_until)
            if first_byte_s is None:
                raise UpstreamAttemptFailed("timed out before answering", upstream=name,
                                            reason="timeout")
            raise UpstreamAttemptFailed(
                f"sent no first byte within {hang:.3g} s (first-byte timeout)",
                upstream=name,
                reason="first_byte_timeout",
            )
        wait = se.over_rate_limit(self.now) if se.fault != "429" else se.retry_after_s
        if wait is not None:
            raise UpstreamAttemptFailed(
                "answered HTTP 429",
                upstream=name,
                reason="http_429",
                status=429,
                retry_after_s=float(max(1, math.ceil(wait))),  # whole seconds, as sent
            )
        if se.engine is None:
            raise _TurnedAway("engine: no physics model")
        rec.delay_s = (se.network_rtt_s + self.fleet.rtt_s(rec.share.region, ep.region)) / 2.0
        self._done[rec.index] = self.loop.create_future()
        se.inflight[rec.index] = rec
        # + the engine's calibrated front end: its queue and intake, then the parallel overhead
        forward_s = rec.delay_s + se.request_overhead_s
        fe = se.frontend
        if fe.request_s > 0 or fe.handoff_s > 0:
            arrive = self.now + rec.delay_s
            taken = fe.intake(arrive)
            if fe.handoff_s > 0:
                # the second piece queues after the parallel wait, behind what arrives until then
                waited = taken + se.request_overhead_s
                bound = waited + fe.handoff_s  # its earliest dispatch
                se.pending.push(bound)
                self._dispatch_handles[rec.index] = self.loop.call_at(
                    waited, self._hand_off, rec, se, waited, bound
                )
                return se
            forward_s += taken - arrive
        if forward_s > 0:
            t = self.now + forward_s
            se.pending.push(t)
            self._dispatch_handles[rec.index] = self.loop.call_at(
                t, self._dispatch, rec, se, True
            )
        else:
            self._dispatch(rec, se, False)
        return se

    def _hand_off(
        self, rec: RequestRecord, se: SimEndpoint, taken: float, bound: float
    ) -> None:
        """The request's first piece of intake and its parallel overhead are done
        (``taken``): its second piece queues at the front end behind whatever arrived
        meanwhile (``physics.frontend``). Its entry in ``se.pending``, ``bound`` (its earliest
        dispatch, so that the engine does not fast-forward past it), becomes its dispatch time
        (`Pending.remove`: no O(n) scan of the pending heap per request)."""
        t = se.frontend.handoff(taken)
        se.pending.remove(bound)
        se.pending.push(t)
        self._dispatch_handles[rec.index] = self.loop.call_at(t, self._dispatch, rec, se, True)

    def _dispatch(self, rec: RequestRecord, se: SimEndpoint, delayed: bool) -> None:
        self._dispatch_handles.pop(rec.index, None)
        if delayed and se.pending:
            se.pending.pop()
        engine = se.engine
        assert engine is not None
        bs = engine.config.block_size
        er = EngineRequest(
            rec.request_id,
            TracePromptTokens(rec.ids, rec.prompt_tokens),
            rec.output_tokens,
            arrival_time=self.now,
            prompt_block_hashes=engine_block_hashes(rec.ids, rec.prompt_tokens, bs),
        )
        try:
            engine.add_request(er, self.now)
        except ValueError:  # larger than its KV cache: what a real engine answers with a 400
            se.inflight.pop(rec.index, None)
            self._fail(rec, _TurnedAway("engine: does not fit"))
            return
        rec.engine_request = er
        se.prefilling.append(rec)
        if not se.busy:
            self._launch(se)

    def _fail(self, rec: RequestRecord, exc: Exception) -> None:
        fut = self._done.get(rec.index)
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def _account(self, rec: RequestRecord, attempt: Placement) -> None:
        """The gateway sees the last token: `Core.account`, with what a relay would observe."""
        er, name = rec.engine_request, rec.endpoint
        assert er is not None and name is not None
        assert er.first_token_time is not None and er.finish_time is not None
        d = rec.delay_s
        rec.completed, rec.status = True, 200
        rec.ttft_s = er.first_token_time + d - rec.arrival_s
        rec.e2e_s = er.finish_time + d - rec.arrival_s
        rec.completion_tokens = 0 if rec.share.api == "embeddings" else er.num_output_tokens
        if er.num_output_tokens > 1:
            rec.itl_s = (er.finish_time - er.first_token_time) / (er.num_output_tokens - 1)
        rec.cached_tokens = max(0, er.num_cached_tokens)
        rec.preemptions = er.num_preemptions
        ep = self.fleet.by_name[name]
        rec.cost_usd = request_cost_usd(
            ep.cost,
            prompt_tokens=rec.prompt_tokens,
            completion_tokens=rec.completion_tokens,
            cached_tokens=rec.cached_tokens,
            seconds=rec.e2e_s,
            max_concurrency=ep.max_concurrency,
        )
        # The engine's inter-token gaps went into the ITL window as they were produced
        # (`_step_done`), grouped per step; the relay's per-chunk list is left empty here.
        stats = StreamStats(
            started=rec.arrival_s,
            first_byte=er.first_token_time + d,
            last_byte=er.finish_time + d,
        )
        usage = {
            "prompt_tokens": rec.prompt_tokens,
            "completion_tokens": rec.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": rec.cached_tokens},
        }
        self.core.account(
            attempt, status=200, started=rec.arrival_s, stats=stats, usage=usage,
            ended=er.finish_time + d,
        )
        rec.engine_request = None  # free the prompt and block lists of long replays
        rec.ids = []

    # -- the batch lane -------------------------------------------------------------------
    async def _lane_wait(self, rec: RequestRecord, pool: PoolKey) -> None:
        """Batch traffic runs on spare capacity only (`Admission.batch_spare`), as the batch
        worker feeds lines: FIFO, at most ``batch.max_concurrency`` at once."""
        if not self._lane and self._lane_may(pool):
            self._lane_take(pool)
            return
        rec.deferred = True
        fut: asyncio.Future[None] = self.loop.create_future()
        self._lane.append((pool, fut))
        if not self._lane_ticking:
            self._lane_ticking = True
            self.loop.create_task(self._lane_tick())
        await fut

    def _lane_may(self, pool: PoolKey) -> bool:
        spec = self.config.batch
        if self._lane_inflight >= spec.max_concurrency:
            return False
        return self.admission.batch_spare(
            pool, self._lane_launching.get(pool, 0), spec.max_utilisation
        )

    def _lane_take(self, pool: PoolKey) -> None:
        self._lane_inflight += 1
        self._lane_launching[pool] = self._lane_launching.get(pool, 0) + 1

    def _lane_pump(self) -> None:
        while self._lane:
            pool, fut = self._lane[0]
            if not self._lane_may(pool):
                return
            self._lane.popleft()
            self._lane_take(pool)
            fut.set_result(None)

    async def _lane_tick(self) -> None:
        """The batch worker's rounds (``batch.poll_interval_s``) while lines wait."""
        try:
            while self._lane:
                await asyncio.sleep(self.config.batch.poll_interval_s)
                self._lane_pump()
        finally:
            self._lane_ticking = False

    # -- faults ---------------------------------------------------------------------------
    def _fault(self, ev: FaultEvent) -> None:
        self.faults_applied += 1
        se = self.by_name[ev.endpoint]
        if ev.event == "up":
            if se.fault in ("down", "hung"):
                se.restart()
                self._probe_later(se.name, True)
            se.fault = None
            return
        if ev.event == "429":
            se.fault, se.retry_after_s = "429", ev.retry_after_s
            return
        se.fault = ev.event
        lost = list(se.inflight.values())
        delay = 0.0 if ev.event == "down" else self.first_byte_timeout_s
        for rec in lost:
            h = self._dispatch_handles.pop(rec.index, None)
            if h is not None:
                h.cancel()
            self.loop.call_later(
                delay, self._fail, rec, _MidStreamFailure(f"{se.name} went {ev.event}")
            )
        se.restart()
        self._probe_later(se.name, False)

    def _probe_later(self, name: str, healthy: bool) -> None:
        """The scraper's next ``/health`` probe sees the change (one that fails marks the
        endpoint down: the gateway's ``failures_to_down`` of 2 is not modelled). A probe of an
        endpoint gone down or hung may be skipped (`_probe_down`); an endpoint coming back is
        marked down, hence probed every turn."""
        every = self.config.gateway.health_interval_s
        at = (math.floor(self.now / every) + 1) * every
        if healthy:
            self.loop.call_at(at, self.live.set_health, name, True)
        else:
            self.loop.call_at(at, self._probe_down, name, at)

    def _probe_down(self, name: str, turn: float) -> None:
        """The probe turn at ``turn`` of an endpoint gone down or hung, as the gateway's
        scraper takes it (`fleet.scraper.serving_vouches`, no probe passed since the fault;
        ``gateway.health_skip_while_serving``): a healthy endpoint that answered a request with a
        2xx within the skip's window (``health_skip_window_s``, `fleet.scraper.skip_window`; at
        least one ``health_interval_s``; the turns fall on its multiples here) and failed none
        in it is not probed: the turn is skipped, and the next one looks again. A failure there (a
        request refused or timed out) forces the probe, which marks it down; with a window
        longer than ``health_interval_s`` a failed scrape (one scraped while down or hung,
        every ``scrape_interval_s`` here: no idle back-off) counts as a failed probe's turn:
        only an answer after it skips (none comes from a down or hung engine). An endpoint
        back (``up``) before its probe passes it: nothing changes."""
        se = self.by_name[name]
        if se.fault not in ("down", "hung"):
            return
        g = self.config.gateway
        window = skip_window(g.health_skip_window_s, g.health_interval_s)
        if (g.health_skip_while_serving and self.live.is_healthy(name)
                and serving_vouches(
                    self.live, name, turn - max(window, g.health_interval_s),
                    vouched=-math.inf, scrape_failed=self._scrape_failed_at.get(name, -math.inf),
                    window_s=window, interval_s=g.health_interval_s)):
            at = turn + g.health_interval_s
            self.loop.call_at(at, self._probe_down, name, at)
            return
        self.live.set_health(name, False)

    # -- engines --------------------------------------------------------------------------
    def _horizon(self, se: SimEndpoint) -> float:
        """The latest time the engine may fast-forward decode to: the next moment a request
        could reach it — now, when anything else runs at this instant (a request's stages); an
        arrival; a dispatch on its way; a hung attempt timing out (then re-placed); or, while
        requests wait in the admission queue or the batch lane, any other engine's next step
        end (a finish there frees the slot a waiter is granted)."""
        if self.loop.busy_now():
            return self.now
        until = self._next_arrival
        first = se.pending.first()
        if first < until:
            until = first
        if self._hung_until and self._hung_until[0] < until:
            until = self._hung_until[0]
        if self.admission.queue.waiting or self._lane:
            for other in self.endpoints:
                end = other.step_end
                if end < until and other is not se:
                    until = end
        return until

    def _launch(self, se: SimEndpoint) -> None:
        """Publish the gauges of this step boundary and start the engine's next step(s)."""
        engine = se.engine
        assert engine is not None
        se.publish()
        out = engine.step_many(self.now, self._horizon(se))
        if out.duration_s <= 0.0 and not out.new_tokens:
            se.busy, se.step_out = False, None  # nothing schedulable (cannot happen when idle)
            se.step_end = math.inf
            return
        se.busy, se.step_out, se.step_end = True, out, out.end_s
        se.step_handle = self.loop.call_at(out.end_s, self._step_done, se)
        fe = se.frontend
        if fe.token_s > 0:  # each step's tokens occupy the front end when produced
            if out.num_steps > 1:  # a run of decode steps, decode_seqs tokens each
                t = out.start_s
                for d in out.step_durations:
                    t += d
                    fe.announce(t, out.decode_seqs)
            else:
                fe.announce(out.end_s, len(out.new_tokens))

    def _step_done(self, se: SimEndpoint) -> None:
        se.step_handle = None
        engine, out = se.engine, se.step_out
        assert engine is not None and out is not None
        gaps = self.totals.itl_gaps
        add_many = self._itl_windows[se.index]
        for s in engine.drain_samples():
            if s.kind == "itl":
                gaps[round(s.seconds, 7)] += s.n
                add_many(s.seconds, s.n)  # LiveFleet.observe_itl ``n`` times, in one call
        if se.prefilling:
            self._first_tokens(se)
        if out.finished:
            recs = self.records
            for rid in out.finished:
                rec = recs[int(rid[1:])]
                se.inflight.pop(rec.index, None)
                if rec.delay_s > 0:
                    self.loop.call_at(self.now + rec.delay_s, self._finish, rec)
                else:
                    self._finish(rec)
        if engine.has_unfinished():
            self._launch(se)
        else:
            se.busy, se.step_out, se.step_end = False, None, math.inf
            se.publish()

    def _first_tokens(self, se: SimEndpoint) -> None:
        """Requests whose first token this step produced: as the gateway does when the first
        chunk arrives, their prefill stops counting as pending on the endpoint."""
        still: list[RequestRecord] = []
        for rec in se.prefilling:
            er = rec.engine_request
            if er is None or er.first_token_time is None:
                if er is not None:
                    still.append(rec)
                continue
            if rec.delay_s > 0:
                self.loop.call_at(er.first_token_time + rec.delay_s, self._first_token, rec)
            else:
                self._first_token(rec)
        se.prefilling = still

    def _first_token(self, rec: RequestRecord) -> None:
        if rec.reservation is not None:
            rec.reservation.first_token()

    def _finish(self, rec: RequestRecord) -> None:
        """The last token reaches the gateway: the request's stream ends."""
        fut = self._done.get(rec.index)
        if fut is not None and not fut.done():
            fut.set_result(None)


# -- entry points -------------------------------------------------------------------------------
def simulate(
    config: FleetConfig,
    trace: Sequence[TraceRequest],
    profile: str,
    *,
    seed: int = 0,
    mix: Sequence[MixEntry] | None = None,
    file: str = "<config>",
    mix_file: str = "<mix>",
    admission: bool | None = None,
    faults: Sequence[FaultEvent] = (),
    assign: Sequence[TrafficShare] | None = None,
) -> Simulator:
    """Replay ``trace`` (already sliced and scaled) with placement profile ``profile``.

    ``admission``: run the admission stage and the batch lane (default: the config's
    ``admission.enabled``); False replays placement alone, as the baselines run.
    Raises `SimulationError` for an unknown profile and `ConfigError` for a bad config or mix.
    Returns the finished `Simulator` (its ``records`` and ``totals``).
    """
    policies = build_policies(config, file, seed=seed)
    policy = policies.get(profile)
    if policy is None:
        raise SimulationError(
            f"unknown placement profile {profile!r}; profiles: {', '.join(sorted(policies))}"
        )
    shares = resolve_mix(config, mix, mix_file) if assign is None else []
    sim = Simulator(
        config,
        policy,
        trace,
        shares,
        seed=seed,
        admission=admission,
        faults=faults,
        assign=assign,
        file=file,
    )
    sim.run()
    return sim


def run_simulation(
    fleet: str | Path,
    trace: str | Path,
    profile: str,
    *,
    format: str | None = None,
    rate_scale: float = 1.0,
    seed: int = 0,
    mix: str | Path | None = None,
    duration_s: float | None = None,
    limit: int | None = None,
    admission: bool | None = None,
    faults: str | Path | None = None,
) -> dict[str, Any]:
    """Load the fleet, trace and mix files, simulate, and return the report (`report`).

    ``faults``: a fault schedule file (`faults.load_faults`).
    Raises `ConfigError` (fleet, mix or faults file), `TraceError` and `SimulationError`.
    """
    t0 = time.perf_counter()
    config = load_config(fleet)
    entries = load_mix(mix) if mix is not None else None
    schedule = (
        load_faults(faults, [e.name for s in config.substrates for e in s.endpoints])
        if faults is not None
        else []
    )
    if not (rate_scale > 0 and math.isfinite(rate_scale)):
        raise SimulationError(f"--rate-scale must be a positive number, got {rate_scale}")
    if duration_s is not None and not duration_s > 0:  # 0 replayed nothing and "succeeded"
        raise SimulationError(f"--duration must be > 0, got {duration_s}")
    if limit is not None and limit < 0:
        raise SimulationError(f"--limit must be >= 0, got {limit}")
    reqs = slice_trace(
        load_trace(trace, format), duration_s=duration_s, rate_scale=rate_scale, limit=limit
    )
    sim = simulate(
        config,
        reqs,
        profile,
        seed=seed,
        mix=entries,
        file=str(fleet),
        mix_file=str(mix),
        admission=admission,
        faults=schedule,
    )
    return build_report(
        sim.records,
        config=sim.config,
        end_s=sim.totals.end_s,
        itl_gaps=sim.totals.itl_gaps,
        profile=profile,
        fleet=str(fleet),
        trace=str(trace),
        rate_scale=rate_scale,
        seed=seed,
        admission=sim.admission.enabled,
        faults=len(schedule),
        faults_applied=sim.faults_applied,
        wall_s=time.perf_counter() - t0,
    )
