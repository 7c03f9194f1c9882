"""The latency predictor: predicted TTFT and ITL of this request on each endpoint, from the
physics roofline and the endpoint's live load, corrected online by observed latencies."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from inferplane.fleet.model import Endpoint
from inferplane.fleet.state import EndpointView
from inferplane.placement.framework import CycleState, Plugin, register
from inferplane.placement.latency_terms import (
    _REF_CHUNK,
    NO_STEP,
    Loads,
    attention_excess_s,
    kept_load_terms,
)
from inferplane.placement.latency_terms import _Consts as _Consts
from inferplane.placement.plugins.affinity import PrefixMatcher, PrefixMode

#: Prompt chunk at which the per-token prefill cost of queued work is measured.
_REF_PREFILL_TOKENS = _REF_CHUNK


class LatencyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: PrefixMode = Field("auto", description="prefix index used for cached tokens")
    capacity_blocks: int = Field(31250, gt=0, description="approximate prefix index per endpoint")
    block_tokens: int = Field(64, gt=0, description="tokens per prompt hash block")
    pending_s: float = Field(
        10.0, ge=0, description="with KV events: blocks of requests sent this recently count as "
        "cached until their events arrive (0: events only)"
    )
    correction_min: float = Field(0.5, gt=0, description="lower clamp of observed/predicted")
    correction_max: float = Field(4.0, gt=0, description="upper clamp of observed/predicted")
    ewma_alpha: float = Field(0.1, gt=0, le=1, description="weight of a new pick's prediction")
    reference_ttft_s: float = Field(1.0, gt=0, description="TTFT scale when no SLO is set")
    unknown_ttft_s: float = Field(2.0, gt=0, description="TTFT when no roofline or history")
    unknown_itl_s: float = Field(0.05, gt=0, description="ITL when no roofline or history")
    error_weight: float = Field(
        1.0, ge=0, description="weight of the expected retry cost of the endpoint's recent "
        "error rate e: TTFT × (1 + error_weight × e ÷ (1 - e)); 0: off"
    )
    max_error_rate: float = Field(
        0.95, gt=0, lt=1, description="e is clamped to this in the retry cost (bounds the factor)"
    )


@register("predicted-latency")
class PredictedLatency(Plugin):
    """Scorer: headroom of the predicted TTFT (and ITL) against the request's SLO.

    Prediction, per endpoint (roofline ``r`` of the served model on the endpoint's hardware):

    * ``cached = min(prompt, prompt × prefix_match ÷ prompt blocks)``, ``uncached = max(1, prompt -
      cached)`` (prefix match from `PrefixMatcher`: precise KV-event index where it covers the
      endpoint, else an approximate index learned from picks);
    * running batch ``B = max(engine running, min(decoding, max_concurrency))`` where
      ``decoding`` = gateway in-flight requests past their first token, each holding ``ctx =
      in-flight tokens ÷ in-flight`` (prompt + max output of this request when idle);
    * prefill queue ahead: the engine prefills FCFS through its per-step token budget, so every
      uncached prompt token the gateway sent that has not yet produced a first token is ahead
      (``pending_prefill_tokens``), plus ``(engine waiting - gateway pending) × ctx`` when the
      engine reports more waiting requests than the gateway sent (other clients);
      ``queue_s = queue_tokens × prefill_s_per_token`` (per-token cost of a 2048-token prefill on
      this hardware); where the profile prices attention apart from the matmuls
      (``attention_cost_factor`` ≠ 1, a calibrated CPU engine; never the table's), each queued
      prompt's attention at its own length instead of a 2048-token chunk's: ``+ excess × (Σ L²
      − 2048 × queue_tokens) ÷ 2`` (``excess``: `latency_terms.attention_excess_s`, ``Σ L²``:
      ``pending_prefill_sq`` plus ``ctx²`` per other client's prompt), at least 0 in all;
    * ``prefill_s = r.step_time_s(uncached, cached, B, B × ctx)`` (one mixed step);
    * the engine's front end (calibrated profiles; 0 in the table): it takes requests in one at
      a time, ``frontend_request_s + frontend_handoff_s`` each (an intake's two pieces,
      ``physics.frontend``), between streaming ``frontend_token_s`` per token of
      the running batch (busy share ``rho = min(0.9, B × frontend_token_s ÷ ITL)``); the
      ``pending`` requests ahead wait ``pending × (frontend_request_s + frontend_handoff_s) ÷
      (1 - rho)``, and
      ``queue_s`` is the longer of that and the engine's queue (two stages in series), plus,
      with ``B > 0`` decoding, the wait behind their chunks
      (``physics.calibration.frontend_wait_s``) and ``B × frontend_token_s`` for its first
      chunk going out with theirs;
    * ``TTFT = (queue_s + prefill_s + fixed) × k_ttft + fleet.rtt_s(client_region, region)``
      with ``fixed = hardware.request_overhead_s + hardware.frontend_request_s +
      hardware.frontend_handoff_s + hardware.frontend_token_s`` (calibrated profiles; 0 in the
      table) plus
      ``hardware.network_rtt_s`` for provider APIs;
    * ``ITL = r.step_time_s(0, 0, B + 1, (B + 1) × ctx) × k_itl`` (0 for embeddings).

    Expected retry cost: with ``e`` the endpoint's recent error rate (share of failed outcomes
    among its last 100, `EndpointState.error_rate`), an attempt there succeeds with probability
    ``1 - e``, so a request expects ``1 ÷ (1 - e)`` attempts before its first token: the TTFT
    above (region RTT included) is multiplied by ``retry = 1 + error_weight × e ÷ (1 -
    min(e, max_error_rate))`` (``1 ÷ (1 - e)`` at the default weight 1; exactly 1 at ``e = 0``,
    so error-free endpoints are scored as before) wherever it is scored or checked against the
    SLO, and the score is divided by ``retry`` (headroom per expected attempt: ``(1 - e) ÷ (1 +
    x)`` at weight 1) — a failing endpoint answers fast and sits idle, so it looks fast, cheap
    and unloaded; when TTFT is far below the SLO the inflated TTFT alone barely moves the
    score. An endpoint that starts failing loses picks (and may stop meeting the SLO) before
    the outlier detector ejects it. The annotated ``ttft_s`` stays one attempt's prediction (the
    first-byte timeout is derived from it; an inflated one would wait longer on a hung engine),
    ``ttft_raw_s`` the uncorrected physics; ``retry_factor`` is annotated when above 1.

    Online correction: TTFT × ``k_ttft = clamp(median over the endpoint's recent requests of
    observed ÷ predicted TTFT, correction_min, correction_max)`` — the gateway (and simulator)
    feed each request's actual TTFT back against its uncorrected prediction (``ttft_raw_s``);
    ITL × ``k_itl = clamp(observed ITL p50 ÷ EWMA of past picks' predictions)``, the EWMA
    updated in ``on_picked``. Both are 1 until data exists. Unknown hardware/model: observed
    p50, else ``unknown_ttft_s`` / ``unknown_itl_s``.

    Score: ``x = max(TTFT × retry ÷ ttft_slo, ITL ÷ itl_slo)`` over the SLOs set (``TTFT ×
    retry ÷ reference_ttft_s`` when none); ``score = 1 ÷ ((1 + x) × retry)`` (0.5 exactly at the
    SLO when ``e = 0``). Annotates
    ``ttft_s``, ``itl_s``, their uncorrected ``ttft_raw_s`` and ``itl_raw_s``, ``queue_s``,
    ``uncached_tokens``, ``meets_slo`` (1/0) for every candidate; the slo-first picker relies on
    them.

    Signals: engine running/waiting (when fresh), gateway in-flight, in-flight tokens and pending
    prefill tokens,
    observed TTFT/ITL p50, the prefix index, region RTTs. Parameters: see `LatencyParams`.
    """

    Params = LatencyParams

    def __init__(self, name: str, params: BaseModel) -> None:
        super().__init__(name, params)
        assert isinstance(params, LatencyParams)
        self.p = params
        self.matcher = PrefixMatcher(
            params.mode, params.capacity_blocks, params.block_tokens, params.pending_s
        )
        self._consts: dict[str, dict[Endpoint, _Consts]] = {}  # model → endpoint → constants
        # model → endpoint → (state, idle ctx, batch, KV tokens, queue_s, raw ITL): what an
        # endpoint's state alone determines, reused while the snapshot keeps that state object
        # (the live fleet rebuilds only the states that changed)
        self._load: dict[str, Loads]
        self._load = {}
        self._kmin, self._kmax = params.correction_min, params.correction_max
        self._unknown_ttft, self._unknown_itl = params.unknown_ttft_s, params.unknown_itl_s
        self._ref_ttft = params.reference_ttft_s
        self._err_w, self._err_max = params.error_weight, params.max_error_rate
        self._ewma: dict[str, tuple[float, float]] = {}  # endpoint → (ttft, itl) predictions
        self._key = f"predicted-latency:{name}"

    def _constants(self, ep: Endpoint, model: str) -> _Consts:
        by_ep = self._consts.get(model)
        if by_ep is None:
            by_ep = self._consts[model] = {}
        r = ep.roofline(model)
        per_tok = r.prefill_time_s(_REF_PREFILL_TOKENS) / _REF_PREFILL_TOKENS if r else 0.0
        rtt = r.hardware.network_rtt_s if r and ep.substrate.kind == "provider-api" else 0.0
        fe_req = fe_tok = 0.0
        if r is not None:
            hw = r.hardware
            fe_req = hw.frontend_request_s + hw.frontend_handoff_s  # both pieces of an intake
            rtt += hw.request_overhead_s + fe_req + hw.frontend_token_s
            fe_tok = hw.frontend_token_s
        c = by_ep[ep] = _Consts(
            r,
            per_tok,
            rtt,
            fe_req,
            fe_tok,
            bool(r and r.model.embedding),
            ep.spec.name,
            ep.substrate.region,
            ep.spec.max_concurrency,
            r.step_terms() if r is not None else NO_STEP,
            attention_excess_s(r),
        )
        return c

    def score(self, cycle: CycleState, candidates: list[EndpointView]) -> Sequence[float]:
        prof = cycle.profile
        fleet = cycle.snapshot.fleet
        prompt = prof.prompt_tokens
        idle_ctx = float(prompt + prof.max_output_tokens)
        ttft_slo, itl_slo = prof.ttft_slo_s, prof.itl_slo_s
        client = prof.client_region
        kmin, kmax = self._kmin, self._kmax
        model = prof.model
        by_ep = self._consts.get(model) or {}
        loads = self._load.get(model)
        if loads is None:
            loads = self._load[model] = {}
        ewma = self._ewma
        unknown_ttft, unknown_itl, ref_ttft = self._unknown_ttft, self._unknown_itl, self._ref_ttft
        err_w, err_max = self._err_w, self._err_max
        matched = self.matcher.matches(cycle, candidates)
        nblocks = len(prof.block_hashes)
        rtts: dict[str, float] = {}
        out: list[float] = []
        append = out.append
        for c, m in zip(candidates, matched, strict=True):
            ep, s = c.endpoint, c.state
            k = by_ep.get(ep) or self._constants(ep, model)
            name = k.name
            cached = min(prompt, int(prompt * m / nblocks)) if nblocks else 0
            uncached = max(1, prompt - cached) if prompt > 0 else 0
            region = k.region
            region_rtt = rtts.get(region)
            if region_rtt is None:
                region_rtt = rtts[region] = fleet.rtt_s(client, region)
            r = k.roofline
            queue_s = 0.0
            if r is None:
                ttft = (s.ttft_p50_s or unknown_ttft) + region_rtt
                itl = s.itl_p50_s or unknown_itl
                raw_t, raw_i = ttft, itl
            else:
                hit = loads.get(ep)
                if hit is not None and hit[0] is s and (s.inflight > 0 or hit[1] == idle_ctx):
                    batch, kv, queue_s, raw_i = hit[2], hit[3], hit[4], hit[5]
                else:
                    batch, kv, queue_s, raw_i = kept_load_terms(ep, s, k, idle_ctx, loads)
                # What the gateway observes: engine time + the gateway↔endpoint network.
                raw_t = queue_s + r.step_time_s(uncached, cached, batch, kv) + k.fixed_s
                ttft, itl = raw_t, raw_i
                f = s.ttft_ratio_p50
                if f is not None:
                    ttft *= kmin if f < kmin else (kmax if f > kmax else f)
                prev = ewma.get(name)
                if prev is not None:
                    obs = s.itl_p50_s
                    if obs is not None and prev[1] > 0:
                        f = obs / prev[1]
                        itl *= kmin if f < kmin else (kmax if f > kmax else f)
                ttft += region_rtt
            # Expected attempts 1 ÷ (1 - e) (see the docstring): scored and checked against the
            # SLO, while ttft_s stays one attempt's prediction (the first-byte timeout's base).
            e = s.error_rate
            retry = 1.0
            expected_ttft = ttft
            if e > 0.0 and err_w > 0.0:
                retry = 1.0 + err_w * e / (1.0 - (e if e < err_max else err_max))
                expected_ttft = ttft * retry
            check_itl = itl_slo is not None and not k.embedding
            if ttft_slo is None and not check_itl:
                meets = True
                x = expected_ttft / ref_ttft
            else:
                x = 0.0 if ttft_slo is None else expected_ttft / ttft_slo
                if check_itl:
                    y = itl / itl_slo  # type: ignore[operator]
                    if y > x:
                        x = y
                meets = x <= 1.0
            ann = cycle.annotations_of(name)
            ann["ttft_s"] = ttft
            ann["ttft_raw_s"] = raw_t  # uncorrected: the gateway feeds back actual ÷ this
            ann["itl_s"] = itl
            ann["itl_raw_s"] = raw_i  # uncorrected, as ttft_raw_s (the cost scorer's input)
            ann["queue_s"] = queue_s
            ann["uncached_tokens"] = float(uncached)
            ann["meets_slo"] = 1.0 if meets else 0.0
            if retry > 1.0:
                ann["retry_factor"] = retry
                append(1.0 / ((1.0 + x) * retry))  # headroom per expected attempt
            else:
                append(1.0 / (1.0 + x))
        cycle.data[self._key] = True  # scored this cycle: `on_picked` reads the annotations
        return out

    def cached_tokens(self, cycle: CycleState, candidates: Sequence[EndpointView]
                      ) -> list[float]:
        """The prompt tokens each candidate holds, as this plugin predicts them cached
        (`PrefixMatcher.cached_tokens`)."""
        return self.matcher.cached_tokens(cycle, candidates)

    def learn_shared(self, cycle: CycleState, picked: EndpointView) -> None:
        """Another replica's pick (`admission.shared_placement`): its prompt blocks are cached
        there now, so this replica predicts the same uncached prefill for them."""
        self.matcher.learn(cycle, picked)

    def on_picked(self, cycle: CycleState, picked: EndpointView) -> None:
        self.matcher.learn(cycle, picked)
        if not cycle.data.get(self._key):
            return  # not scored by this plugin
        ann = cycle.annotations.get(picked.name)
        if ann is None or "ttft_raw_s" not in ann:
            return
        t, i = ann["ttft_raw_s"], ann["itl_raw_s"]  # the uncorrected prediction
        prev = self._ewma.get(picked.name)
        a = self.p.ewma_alpha
        self._ewma[picked.name] = (
            (t, i) if prev is None else (prev[0] + a * (t - prev[0]), prev[1] + a * (i - prev[1]))
        )
