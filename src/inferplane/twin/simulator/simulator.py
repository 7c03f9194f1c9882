"""The offline simulator: replay a trace through the real placement code on a virtual clock.

Every arrival is classified from a traffic mix into a `RequestProfile` and placed by the *same*
``place()`` and `Policy` the gateway runs, against a `FleetSnapshot` from the same `LiveFleet`
(on the virtual clock). Each endpoint is an emulated vLLM `Engine` timed by its roofline, so
what the simulator says about a policy is what the gateway would do on that fleet.

A discrete-event loop over a heap, in virtual seconds. At one instant the order is: step
completions, gateway-side finishes, scrapes, dispatches, then arrivals.

- **arrival** (trace time / ``rate_scale``): build the profile, snapshot, ``place()``; reserve
  ``prompt + max output`` tokens on the pick (as the gateway does) or count a rejection with the
  filters that removed endpoints. The request reaches the engine half its network RTT later.
- **dispatch**: the engine queues the request; an idle engine starts a step.
- **step completion**: finished requests are accounted (after the return half of the RTT), the
  engine publishes its gauges (its ``/metrics``, as of this step boundary) and starts its next
  step with ``step_many``, which fast-forwards steady decode up to the next moment a request
  could reach it.
- **scrape**: every ``gateway.scrape_interval_s`` of virtual time in which a request arrives,
  the published gauges of every engine are copied into `LiveFleet` (``update_metrics``), so
  placement sees engine signals exactly as stale as the gateway would. Gateway signals
  (in-flight requests and tokens, TTFT/ITL windows) are exact.

Fidelity notes. Network delay is the hardware's ``network_rtt_s`` (provider APIs) plus the RTT
between the client's region and the endpoint's. The gateway adds a request's inter-token gaps
to its ITL window when the request ends; the simulator adds them when the engine emits them
(grouped per step, which avoids per-token work). No rate limits, failures or retries. An
endpoint serving several models runs one engine timed by its first model that fits.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

from inferplane.config.loader import load_config
from inferplane.config.schema import FleetConfig, MixEntry
from inferplane.fleet.live import LiveFleet
from inferplane.fleet.model import Fleet
from inferplane.fleet.pricing import request_cost_usd
from inferplane.placement.build import build_policies
from inferplane.placement.framework import Policy, place
from inferplane.placement.profile import RequestProfile
from inferplane.twin.engine.model import EngineRequest
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
from inferplane.twin.traces.loader import TraceRequest, load_trace, slice_trace

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

# Event kinds, in the order they run at one instant (arrivals come last, from their own list).
_STEP, _FINISH, _SCRAPE, _DISPATCH, _FIRST = 0, 1, 2, 3, 4
_ITL_WINDOW = 1024  # the gateway's ITL window size: more equal samples change nothing


# -- the simulator ------------------------------------------------------------------------------
@dataclass(slots=True)
class _Totals:
    itl_gaps: Counter[float] = field(default_factory=Counter)
    end_s: float = 0.0


class Simulator:
    """One replay of ``trace`` (already sliced and scaled) through ``policy`` on ``config``."""

    def __init__(
        self,
        config: FleetConfig,
        policy: Policy,
        trace: Sequence[TraceRequest],
        shares: Sequence[TrafficShare],
        *,
        seed: int = 0,
    ) -> None:
        if not shares:
            raise SimulationError("the traffic mix is empty")
        self.config = config
        self.policy = policy
        self.fleet = Fleet.from_config(config)
        self.now = 0.0
        g = config.gateway
        self.scrape_interval_s = g.scrape_interval_s
        self.block_chars = g.prefix_block_chars
        self.live = LiveFleet(self.fleet, stale_after_s=g.stale_after_s, clock=self._clock)
        self.endpoints = [SimEndpoint(e, i) for i, e in enumerate(self.fleet.endpoints)]
        self.by_name = {se.name: se for se in self.endpoints}
        self._itl_windows = [self.live.live[se.name].itl.add for se in self.endpoints]
        self.totals = _Totals()
        self._heap: list[tuple[float, int, int, int]] = []
        self._seq = 0
        self._next_arrival = math.inf
        rng = random.Random(seed)
        weights = [s.fraction for s in shares]
        next_id = SYNTHETIC_ID_BASE
        self.records: list[RequestRecord] = []
        for i, tr in enumerate(trace):
            share = shares[0] if len(shares) == 1 else rng.choices(shares, weights)[0]
            prompt = max(1, tr.input_tokens)
            ids, next_id = padded_ids(tr.hash_ids, prompt, next_id)
            # An embedding is one engine step (prefill, one "token"), and no output tokens.
            out = 1 if share.api == "embeddings" else max(1, tr.output_tokens)
            self.records.append(RequestRecord(i, f"r{i}", tr.arrival_s, prompt, out, share, ids))
        self._model_seeds = {s.model: seed_of(s.model) for s in shares}
        for se in self.endpoints:
            se.publish()
            m = se.metrics()
            if m is not None:
                self.live.update_metrics(se.name, m)

    def _clock(self) -> float:
        return self.now

    def _push(self, t: float, kind: int, payload: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, kind, self._seq, payload))

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> list[RequestRecord]:
        """Run to the last completion; returns every record (also in ``self.records``)."""
        recs = self.records
        iv = self.scrape_interval_s
        last_tick = -1
        for r in recs:  # one scrape in every interval a request arrives in
            tick = math.floor(r.arrival_s / iv)
            if tick != last_tick:
                last_tick = tick
                self._push(min(tick * iv, r.arrival_s), _SCRAPE, 0)
        heap, n, ai = self._heap, len(recs), 0
        self._next_arrival = recs[0].arrival_s if recs else math.inf
        while True:
            if heap and heap[0][0] <= self._next_arrival:
                t, kind, _, x = heapq.heappop(heap)
                self.now = t
                if kind == _STEP:
                    self._step_done(self.endpoints[x])
                elif kind == _FINISH:
                    self._finish(recs[x])
                elif kind == _SCRAPE:
                    self._scrape()
                elif kind == _FIRST:
                    self._first_token(recs[x])
                else:
                    self._dispatch(recs[x])
            elif ai < n:
                rec = recs[ai]
                ai += 1
                self._next_arrival = recs[ai].arrival_s if ai < n else math.inf
                self.now = rec.arrival_s
                self._arrive(rec)
            else:
                break
        self.totals.end_s = self.now
        return recs

    def _scrape(self) -> None:
        for se in self.endpoints:
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
        decision = place(
            self._profile(rec), self.live.snapshot(), self.policy, decision_id=rec.request_id
        )
        view = decision.picked
        if view is None:
            rec.rejected_by = tuple(name for name, k in decision.removed_by.items() if k) or (
                "no-endpoints",
            )
            return
        ep = view.endpoint
        rec.endpoint, rec.substrate, rec.jurisdiction = ep.name, ep.substrate.name, ep.jurisdiction
        rec.spillover = decision.spillover is not None
        p = decision.profile  # reserve as the gateway does: prompt + max output tokens
        ann = decision.candidate(ep.name).annotations
        uncached = ann.get("uncached_tokens")
        rec.predicted_ttft_s = ann.get("ttft_raw_s")
        rec.reservation = self.live.reserve(
            ep.name,
            p.prompt_tokens + p.max_output_tokens,
            prefill_tokens=p.prompt_tokens if uncached is None else int(uncached),
        )
        se = self.by_name[ep.name]
        rec.delay_s = (se.network_rtt_s + self.fleet.rtt_s(rec.share.region, ep.region)) / 2.0
        forward_s = rec.delay_s + se.request_overhead_s  # + the engine's calibrated front end
        if forward_s > 0:
            t = self.now + forward_s
            heapq.heappush(se.pending, t)
            self._push(t, _DISPATCH, rec.index)
        else:
            self._dispatch(rec)

    def _dispatch(self, rec: RequestRecord) -> None:
        assert rec.endpoint is not None
        se = self.by_name[rec.endpoint]
        if rec.delay_s > 0:
            heapq.heappop(se.pending)
        engine = se.engine
        if engine is None:
            self._turn_away(rec, "engine: no physics model")
            return
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
            self._turn_away(rec, "engine: does not fit")
            return
        rec.engine_request = er
        se.prefilling.append(rec)
        if not se.busy:
            self._launch(se)

    def _turn_away(self, rec: RequestRecord, reason: str) -> None:
        rec.rejected_by = (reason,)
        if rec.reservation is not None:
            rec.reservation.release()
        assert rec.endpoint is not None
        self.live.observe_outcome(rec.endpoint, False)

    def _launch(self, se: SimEndpoint) -> None:
        """Publish the gauges of this step boundary and start the engine's next step(s)."""
        engine = se.engine
        assert engine is not None
        se.publish()
        until = self._next_arrival
        if se.pending and se.pending[0] < until:
            until = se.pending[0]
        out = engine.step_many(self.now, until)
        if out.duration_s <= 0.0 and not out.new_tokens:
            se.busy, se.step_out = False, None  # nothing schedulable (cannot happen when idle)
            return
        se.busy, se.step_out = True, out
        self._push(out.end_s, _STEP, se.index)

    def _step_done(self, se: SimEndpoint) -> None:
        engine, out = se.engine, se.step_out
        assert engine is not None and out is not None
        gaps = self.totals.itl_gaps
        add = self._itl_windows[se.index]
        for s in engine.drain_samples():
            if s.kind == "itl":
                gaps[round(s.seconds, 7)] += s.n
                for g in repeat(s.seconds, min(s.n, _ITL_WINDOW)):
                    add(g)  # LiveFleet.observe_itl, without a lookup per token
        if se.prefilling:
            self._first_tokens(se)
        if out.finished:
            recs = self.records
            for rid in out.finished:
                rec = recs[int(rid[1:])]
                if rec.delay_s > 0:
                    self._push(self.now + rec.delay_s, _FINISH, rec.index)
                else:
                    self._finish(rec)
        if engine.has_unfinished():
            self._launch(se)
        else:
            se.busy, se.step_out = False, None
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
                self._push(er.first_token_time + rec.delay_s, _FIRST, rec.index)
            else:
                self._first_token(rec)
        se.prefilling = still

    def _first_token(self, rec: RequestRecord) -> None:
        """The first token reaches the gateway: as `Gateway.account` does, the request stops
        counting as pending prefill and its TTFT is fed back against its prediction."""
        er = rec.engine_request
        if rec.reservation is not None:
            rec.reservation.first_token()
        if er is not None and er.first_token_time is not None and rec.endpoint is not None:
            ttft = er.first_token_time + rec.delay_s - rec.arrival_s
            self.live.observe_ttft(rec.endpoint, ttft, rec.predicted_ttft_s)

    def _finish(self, rec: RequestRecord) -> None:
        """The gateway sees the last token: account the request as ``Gateway.account`` does."""
        er, name = rec.engine_request, rec.endpoint
        assert er is not None and name is not None and rec.reservation is not None
        assert er.first_token_time is not None and er.finish_time is not None
        rec.reservation.release()
        d = rec.delay_s
        rec.completed = True
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
        self.live.observe_outcome(name, True)
        rec.engine_request = None  # free the prompt and block lists of long replays
        rec.ids = []


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
) -> Simulator:
    """Replay ``trace`` (already sliced and scaled) with placement profile ``profile``.

    Raises `SimulationError` for an unknown profile and `ConfigError` for a bad config or mix.
    Returns the finished `Simulator` (its ``records`` and ``totals``).
    """
    policies = build_policies(config, file, seed=seed)
    policy = policies.get(profile)
    if policy is None:
        raise SimulationError(
            f"unknown placement profile {profile!r}; profiles: {', '.join(sorted(policies))}"
        )
    sim = Simulator(config, policy, trace, resolve_mix(config, mix, mix_file), seed=seed)
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
) -> dict[str, Any]:
    """Load the fleet, trace and mix files, simulate, and return the report (`report`).

    Raises `ConfigError` (fleet or mix file), `TraceError` and `SimulationError`.
    """
    t0 = time.perf_counter()
    config = load_config(fleet)
    entries = load_mix(mix) if mix is not None else None
    if not (rate_scale > 0 and math.isfinite(rate_scale)):
        raise SimulationError(f"--rate-scale must be a positive number, got {rate_scale}")
    if duration_s is not None and not duration_s >= 0:
        raise SimulationError(f"--duration must be >= 0, got {duration_s}")
    if limit is not None and limit < 0:
        raise SimulationError(f"--limit must be >= 0, got {limit}")
    reqs = slice_trace(
        load_trace(trace, format), duration_s=duration_s, rate_scale=rate_scale, limit=limit
    )
    sim = simulate(
        config, reqs, profile, seed=seed, mix=entries, file=str(fleet), mix_file=str(mix)
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
        wall_s=time.perf_counter() - t0,
    )
