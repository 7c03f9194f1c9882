"""Resource scorers: load, cost, locality (RTT, egress, data co-location) and energy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from inferplane.fleet.model import Endpoint
from inferplane.fleet.state import EndpointView
from inferplane.physics import Roofline
from inferplane.placement.framework import CycleState, Plugin, register


def _minmax_low_is_best(xs: Sequence[float]) -> list[float]:
    """``(max - x) / (max - min)``: the lowest value scores 1, the highest 0; all 1 when equal."""
    lo, hi = min(xs), max(xs)
    if hi - lo <= 1e-18:
        return [1.0] * len(xs)
    span = hi - lo
    return [(hi - x) / span for x in xs]


class LoadParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    queue_weight: float = Field(1.0, ge=0, description="weight of requests vs envelope")
    tokens_weight: float = Field(1.0, ge=0, description="weight of in-flight tokens vs KV size")
    kv_weight: float = Field(1.0, ge=0, description="weight of engine KV usage")


@register("load")
class Load(Plugin):
    """Scorer: spare capacity, in absolute terms so heterogeneous endpoints compare fairly.

    Formula: ``load = (wq × min(1, (in-flight + engine waiting) ÷ max_concurrency)
    + wt × min(1, in-flight tokens ÷ KV capacity tokens) + wk × KV usage) ÷ (wq + wt + wk)``,
    ``score = 1 - load``. KV capacity is ``num_gpu_blocks × block_size`` when the engine reports
    it, else the roofline's estimate; KV usage counts only when engine metrics are fresh (0
    otherwise, its weight still in the denominator). Parameters: ``queue_weight``,
    ``tokens_weight``, ``kv_weight``.
    """

    Params = LoadParams

    def __init__(self, name: str, params: BaseModel) -> None:
        super().__init__(name, params)
        assert isinstance(params, LoadParams)
        self.wq, self.wt, self.wk = params.queue_weight, params.tokens_weight, params.kv_weight
        self.norm = (self.wq + self.wt + self.wk) or 1.0
        self._kv_cap: dict[tuple[Endpoint, str], float] = {}

    def _capacity(self, ep: Endpoint, model: str) -> float:
        cap = self._kv_cap.get((ep, model))
        if cap is None:
            r = ep.roofline(model)
            util = ep.spec.emulation.gpu_memory_utilization
            cap = float(r.kv_capacity_tokens(util)) if r is not None else 0.0
            self._kv_cap[(ep, model)] = cap = max(cap, 1.0)
        return cap

    def score(self, cycle: CycleState, candidates: list[EndpointView]) -> Sequence[float]:
        model = cycle.profile.model
        wq, wt, wk, norm = self.wq, self.wt, self.wk, self.norm
        out: list[float] = []
        for c in candidates:
            s = c.state
            x = (s.inflight + s.queue_depth) / c.endpoint.spec.max_concurrency
            conc = x if x < 1.0 else 1.0  # min(1.0, x)
            blocks, block_size = s.num_gpu_blocks, s.block_size
            if blocks and block_size:
                cap = float(blocks * block_size)
            else:
                cap = self._capacity(c.endpoint, model)
            x = s.inflight_tokens / cap
            tok = x if x < 1.0 else 1.0
            kv_usage = s.kv_usage
            kv = kv_usage if not s.stale and kv_usage is not None else 0.0
            out.append(1.0 - (wq * conc + wt * tok + wk * kv) / norm)
        return out


@dataclass(frozen=True, slots=True)
class _Price:
    hourly: float | None
    input: float
    cached: float
    output: float
    burst: bool
    concurrency: int
    roofline: Roofline | None
    region: str


class CostParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    output_fraction: float = Field(
        0.5, gt=0, le=1, description="expected share of max_output_tokens generated"
    )
    burst_factor: float = Field(
        1.25, ge=1, description="burst costs count this many times in the score"
    )
    default_duration_s: float = Field(10.0, gt=0, description="when no prediction exists")


@register("cost")
class Cost(Plugin):
    """Scorer: predicted cost of this request; cheapest scores 1, most expensive 0.

    Cost: per-token prices ``(uncached × input + cached × cached_input + out × output) ÷ 1e6``
    with ``out = output_fraction × max_output_tokens``; hourly substrates amortise
    ``hourly_usd ÷ 3600 × duration ÷ max_concurrency`` with ``duration = TTFT + out × ITL``
    — the time the physics model predicts: predicted-latency's *uncorrected* ``ttft_raw_s``
    (the gateway's own queue model included) plus the region RTT, and ``itl_raw_s``, when
    present (an endpoint's momentary measured slowness would make identical endpoints at one
    price cost differently), else a roofline estimate at the current batch
    ``max(in-flight, engine running) + 1`` — see `inferplane.fleet.pricing`. The score
    ranks ``cost × burst_factor`` for burst capacity (reserved preferred), min–max normalised.
    Annotates ``cost_usd`` (unweighted).
    Parameters: ``output_fraction``, ``burst_factor``, ``default_duration_s``.
    """

    Params = CostParams

    def __init__(self, name: str, params: BaseModel) -> None:
        super().__init__(name, params)
        assert isinstance(params, CostParams)
        self.p = params
        self._prices: dict[str, dict[Endpoint, _Price]] = {}  # model → endpoint → price

    def _price(self, ep: Endpoint, model: str) -> _Price:
        by_ep = self._prices.get(model)
        if by_ep is None:
            by_ep = self._prices[model] = {}
        pr = by_ep.get(ep)
        if pr is None:
            c = ep.substrate.cost
            inp = c.input_per_mtok or 0.0
            pr = _Price(
                hourly=c.hourly_usd,
                input=inp / 1e6,
                cached=(c.cached_input_per_mtok if c.cached_input_per_mtok is not None else inp)
                / 1e6,
                output=(c.output_per_mtok or 0.0) / 1e6,
                burst=ep.substrate.capacity_class == "burst",
                concurrency=max(1, ep.spec.max_concurrency),
                roofline=ep.roofline(model),
                region=ep.substrate.region,
            )
            by_ep[ep] = pr
        return pr

    def score(self, cycle: CycleState, candidates: list[EndpointView]) -> Sequence[float]:
        prof = cycle.profile
        fleet = cycle.snapshot.fleet
        out_tok = self.p.output_fraction * prof.max_output_tokens
        burst_factor = self.p.burst_factor
        prompt = prof.prompt_tokens
        fprompt = float(prompt)
        model = prof.model
        client = prof.client_region
        prices = self._prices.get(model) or {}
        rtts: dict[str, float] = {}
        ranked: list[float] = []
        for c in candidates:
            ep = c.endpoint
            pr = prices.get(ep) or self._price(ep, model)
            ann = cycle.annotations_of(c.name)
            u = ann.get("uncached_tokens", fprompt)
            uncached = u if u < fprompt else fprompt  # min(float(prompt), u)
            if pr.hourly is None:
                usd = uncached * pr.input + (prompt - uncached) * pr.cached + out_tok * pr.output
            else:
                # The physics model's time, not the corrected latency: the observed ITL of two
                # identical endpoints at one price differs by tens of percent from moment to
                # moment, which made their costs differ and outvote prefix affinity.
                ttft, itl = ann.get("ttft_raw_s"), ann.get("itl_raw_s")
                if ttft is not None:
                    region = pr.region
                    rtt = rtts.get(region)
                    if rtt is None:
                        rtt = rtts[region] = fleet.rtt_s(client, region)
                    ttft = ttft + rtt
                if ttft is None or itl is None:
                    ttft, itl = self._estimate(pr.roofline, c, prompt, out_tok)
                duration = ttft + out_tok * itl
                usd = pr.hourly / 3600.0 * duration / pr.concurrency
            ann["cost_usd"] = usd
            ranked.append(usd * burst_factor if pr.burst else usd)
        return _minmax_low_is_best(ranked)

    def _estimate(
        self, r: Roofline | None, c: EndpointView, prompt: int, out_tok: float
    ) -> tuple[float, float]:
        if r is None:
            return self.p.default_duration_s, 0.0
        s = c.state
        running = int(s.running) if not s.stale and s.running is not None else 0
        batch = max(s.inflight, running) + 1
        ctx = prompt + int(out_tok)
        itl = 0.0 if r.model.embedding else r.step_time_s(0, 0, batch, batch * ctx)
        return r.step_time_s(max(1, prompt), 0, 0, 0), itl


class LocalityParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rtt_weight: float = Field(1.0, ge=0)
    egress_weight: float = Field(1.0, ge=0)
    data_weight: float = Field(1.0, ge=0)
    rtt_reference_s: float = Field(0.2, gt=0, description="RTT that scores 0")
    bytes_per_token: float = Field(4.0, gt=0, description="wire bytes per prompt/output token")
    output_fraction: float = Field(0.5, gt=0, le=1)


@register("locality")
class Locality(Plugin):
    """Scorer: keep the request near its client and its data.

    Terms: ``rtt = 1 - min(1, fleet.rtt_s(client_region, region) ÷ rtt_reference_s)``;
    ``egress = 1 - e ÷ max(e)`` over candidates, with ``e`` the cross-region egress in USD —
    prompt bytes out of the client region (and out of ``data_region`` when it differs from the
    endpoint's) at that region's ``egress_usd_per_gb``, output bytes out of the endpoint's
    region when the client is elsewhere; ``data = 1`` when ``profile.data_region`` is unset or
    is the endpoint's region, else 0. ``score = (wr × rtt + we × egress + wd × data) ÷ (wr +
    we + wd)``. Annotates ``rtt_s`` and ``egress_usd``. Parameters: see `LocalityParams`.
    """

    Params = LocalityParams

    def __init__(self, name: str, params: BaseModel) -> None:
        super().__init__(name, params)
        assert isinstance(params, LocalityParams)
        self.p = params
        self.norm = (params.rtt_weight + params.egress_weight + params.data_weight) or 1.0

    def score(self, cycle: CycleState, candidates: list[EndpointView]) -> Sequence[float]:
        prof = cycle.profile
        p = self.p
        fleet = cycle.snapshot.fleet
        regions = fleet.regions
        client, data = prof.client_region, prof.data_region
        in_gb = prof.prompt_tokens * p.bytes_per_token / 1e9
        out_gb = p.output_fraction * prof.max_output_tokens * p.bytes_per_token / 1e9

        def rate(region: str | None) -> float:
            spec = regions.get(region) if region is not None else None
            return spec.egress_usd_per_gb if spec is not None else 0.0

        # Everything but the egress normalisation depends only on the endpoint's region:
        # computed once per region, in the same order of operations as per candidate.
        per_region: dict[str, tuple[float, float]] = {}
        cand_regions: list[str] = []
        egress: list[float] = []
        for c in candidates:
            region = c.endpoint.substrate.region
            got = per_region.get(region)
            if got is None:
                rtt = fleet.rtt_s(client, region)
                e = 0.0
                if client is not None and client != region:
                    e += in_gb * rate(client) + out_gb * rate(region)
                if data is not None and data != region:
                    e += in_gb * rate(data)
                got = per_region[region] = (rtt, e)
            rtt, e = got
            cand_regions.append(region)
            egress.append(e)
            ann = cycle.annotations_of(c.name)
            ann["rtt_s"] = rtt
            ann["egress_usd"] = e
        emax = max(egress)
        scores: dict[str, float] = {}
        for region, (rtt, e) in per_region.items():
            r_term = 1.0 - min(1.0, rtt / p.rtt_reference_s)
            e_term = 1.0 - e / emax if emax > 0 else 1.0
            d_term = 1.0 if data is None or data == region else 0.0
            scores[region] = (
                p.rtt_weight * r_term + p.egress_weight * e_term + p.data_weight * d_term
            ) / self.norm
        return [scores[region] for region in cand_regions]


class EnergyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_batch: int = Field(1, gt=0, description="batch assumed for an idle endpoint")


@register("energy")
class Energy(Plugin):
    """Scorer: fewer joules per generated token, for energy-aware classes only.

    Formula: ``j = roofline.joules_per_token(B, ctx)`` at the endpoint's current batch
    ``B = max(min_batch, in-flight + 1)`` and ``ctx = prompt + max_output`` tokens per
    sequence; ``score = (max j - j) ÷ (max j - min j)``; endpoints without a roofline score 0.
    Returns 1.0 for every candidate unless ``profile.energy_aware``. Annotates
    ``joules_per_token``. Parameters: ``min_batch``.
    """

    Params = EnergyParams

    def __init__(self, name: str, params: BaseModel) -> None:
        super().__init__(name, params)
        assert isinstance(params, EnergyParams)
        self.min_batch = params.min_batch

    def score(self, cycle: CycleState, candidates: list[EndpointView]) -> Sequence[float]:
        prof = cycle.profile
        if not prof.energy_aware:
            return [1.0] * len(candidates)
        ctx = max(1, prof.prompt_tokens + prof.max_output_tokens)
        js: list[float | None] = []
        for c in candidates:
            r = c.endpoint.roofline(prof.model)
            if r is None or r.model.embedding:
                js.append(None)
                continue
            j = r.joules_per_token(max(self.min_batch, c.state.inflight + 1), ctx)
            cycle.annotate(c.name, "joules_per_token", j)
            js.append(j)
        known = [j for j in js if j is not None]
        if not known:
            return [1.0] * len(candidates)
        worst = max(known)
        scores = _minmax_low_is_best([worst if j is None else j for j in js])
        return [0.0 if j is None else v for j, v in zip(js, scores, strict=True)]
