"""Baseline routers, reimplemented from their documented algorithms so that the simulator and
the gateway can compare inferplane's default policy with what the field runs today.

* Gateway API Inference Extension / llm-d default: ``queue-scorer`` (2),
  ``kv-cache-utilization-scorer`` (2), ``prefix-cache-scorer`` (3), max-score picker.
* llm-d optimized baseline: ``prefix-cache-affinity`` filter + ``token-load-scorer``.
* SGLang router ``cache_aware`` policy: ``sglang-cache-aware`` picker.
* NVIDIA Dynamo KV router: ``dynamo-kv`` picker.

Each docstring cites its source. Load is what each router itself tracks (its own in-flight
requests or tokens) or what it scrapes (queue, KV usage), as upstream does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from inferplane.fleet.state import EndpointView
from inferplane.placement.framework import CycleState, FilterResult, Plugin, Scored, register
from inferplane.placement.plugins.affinity import PrefixMatcher, PrefixMode


@register("queue-scorer")
class QueueScorer(Plugin):
    """Scorer (GIE ``queue-scorer``): ``(maxQ - q) ÷ (maxQ - minQ)`` over the engines' waiting
    queue lengths, 1.0 for all when equal. Source: kubernetes-sigs/gateway-api-inference-extension,
    ``pkg/epp/scheduling/framework/plugins/scorer/queue.go``. Signals: engine ``waiting`` (0 when
    stale). Parameters: none."""

    def score(self, cycle: CycleState, candidates: list[EndpointView]) -> Sequence[float]:
        qs = [c.state.queue_depth for c in candidates]
        lo, hi = min(qs), max(qs)
        if hi - lo <= 0:
            return [1.0] * len(qs)
        return [(hi - q) / (hi - lo) for q in qs]


@register("kv-cache-utilization-scorer")
class KvCacheUtilizationScorer(Plugin):
    """Scorer (GIE ``kv-cache-utilization-scorer``): ``1 - kv_cache_usage``. Source:
    kubernetes-sigs/gateway-api-inference-extension, ``plugins/scorer/kvcache_utilization.go``.
    Signals: engine KV usage as last scraped (0 when never scraped). Parameters: none."""

    def score(self, cycle: CycleState, candidates: list[EndpointView]) -> Sequence[float]:
        return [1.0 - (c.state.kv_usage or 0.0) for c in candidates]


class TokenLoadParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    queue_threshold_tokens: int = Field(4_194_304, gt=0, description="tokens that score 0")


@register("token-load-scorer")
class TokenLoadScorer(Plugin):
    """Scorer (llm-d ``token-load-scorer``): ``1 - min(1, in-flight tokens ÷
    queue_threshold_tokens)``. Source: llm-d optimized baseline
    (https://llm-d.ai/docs/guides/optimized-baseline) and the llm-d router configuration
    reference. Signals: gateway in-flight tokens. Parameters: ``queue_threshold_tokens``."""

    Params = TokenLoadParams

    def __init__(self, name: str, params: BaseModel) -> None:
        super().__init__(name, params)
        assert isinstance(params, TokenLoadParams)
        self.threshold = float(params.queue_threshold_tokens)

    def score(self, cycle: CycleState, candidates: list[EndpointView]) -> Sequence[float]:
        t = self.threshold
        return [1.0 - min(1.0, c.state.inflight_tokens / t) for c in candidates]


class _IndexParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: PrefixMode = "auto"
    capacity_blocks: int = Field(31250, gt=0)
    block_tokens: int = Field(64, gt=0)


class AffinityFilterParams(_IndexParams):
    threshold: float = Field(0.80, ge=0, le=1, description="prefix score that makes sticky")
    peak_prefill_tokens_per_s: float = Field(15928.0, gt=0)
    max_ttft_penalty_s: float = Field(18.0, ge=0, description="0 = always stick")


@register("prefix-cache-affinity")
class PrefixCacheAffinityFilter(Plugin):
    """Filter (llm-d ``prefix-cache-affinity-filter``): "sticky until saturated".

    Keeps the endpoints whose prefix score (leading matched blocks ÷ prompt blocks) is
    ``≥ threshold``; keeps everything when none or all are sticky, or when the best sticky
    endpoint's estimated TTFT (``in-flight tokens ÷ peak_prefill_tokens_per_s``) exceeds the
    best non-sticky one's by more than ``max_ttft_penalty_s`` (when that is > 0). Prefix index
    as `PrefixMatcher` (precise KV events where available — llm-d's precise prefix-cache
    mode — else learned from picks). Source: llm-d optimized baseline
    (https://llm-d.ai/docs/guides/optimized-baseline), llm-d router configuration reference.
    Parameters: ``threshold``, ``peak_prefill_tokens_per_s``, ``max_ttft_penalty_s``, ``mode``,
    ``capacity_blocks``, ``block_tokens``.
    """

    Params = AffinityFilterParams

    def __init__(self, name: str, params: BaseModel) -> None:
        super().__init__(name, params)
        assert isinstance(params, AffinityFilterParams)
        self.p = params
        self.matcher = PrefixMatcher(  # as the original: KV events only
            params.mode, params.capacity_blocks, params.block_tokens, pending_s=0.0
        )

    def filter(self, cycle: CycleState, candidates: list[EndpointView]) -> FilterResult:
        total = len(cycle.profile.block_hashes)
        if total == 0:
            return FilterResult(candidates)
        matched = self.matcher.matches(cycle, candidates)
        ratio = [m / total for m in matched]
        sticky = [c for c, r in zip(candidates, ratio, strict=True) if r >= self.p.threshold]
        if not sticky or len(sticky) == len(candidates):
            return FilterResult(candidates)
        if self.p.max_ttft_penalty_s > 0:
            rate = self.p.peak_prefill_tokens_per_s
            names = {c.name for c in sticky}
            best_sticky = min(c.state.inflight_tokens for c in sticky) / rate
            best_other = (
                min(c.state.inflight_tokens for c in candidates if c.name not in names) / rate
            )
            if best_sticky - best_other > self.p.max_ttft_penalty_s:
                cycle.notes.append("prefix affinity released: sticky endpoints saturated")
                return FilterResult(candidates)
        rejected = {
            c.name: f"prefix score {r:.2f} < {self.p.threshold:.2f} (sticky endpoints exist)"
            for c, r in zip(candidates, ratio, strict=True)
            if r < self.p.threshold
        }
        return FilterResult(sticky, rejected)

    def propose(self, cycle: CycleState, limit: int) -> list[str]:
        return self.matcher.propose(cycle, limit)

    def on_picked(self, cycle: CycleState, picked: EndpointView) -> None:
        self.matcher.learn(cycle, picked)


class SglangParams(_IndexParams):
    mode: PrefixMode = "approximate"
    cache_threshold: float = Field(0.3, ge=0, le=1)
    balance_abs_threshold: float = Field(64, ge=0)
    balance_rel_threshold: float = Field(1.5, ge=1)


@register("sglang-cache-aware")
class SglangCacheAware(Plugin):
    """Picker (SGLang router ``cache_aware`` policy), ignoring scores.

    Load = requests this router has in flight on the endpoint. If ``max - min >
    balance_abs_threshold`` and ``max > balance_rel_threshold × min``: the least-loaded
    endpoint. Otherwise the endpoint with the highest prefix match ratio (leading matched blocks
    ÷ prompt blocks, standing in for SGLang's character radix tree) if that ratio is ``>
    cache_threshold``, else the endpoint with the smallest tree (fewest indexed blocks), ties by
    load. Every pick is inserted into the pick's tree (``on_picked``). Ties at random (seeded).
    Source: sgl-project/sglang, ``sgl-router/src/policies/cache_aware.rs`` and
    ``docs/router/router.md`` (the upstream defaults are 0.5 / 32 / 1.0001; these defaults are
    0.3 / 64 / 1.5 as the router's documentation examples use). Parameters:
    ``cache_threshold``, ``balance_abs_threshold``, ``balance_rel_threshold``, ``mode``,
    ``capacity_blocks`` (the tree's bound), ``block_tokens``.
    """

    Params = SglangParams

    def __init__(self, name: str, params: BaseModel) -> None:
        super().__init__(name, params)
        assert isinstance(params, SglangParams)
        self.p = params
        self.matcher = PrefixMatcher(  # as the original: KV events only
            params.mode, params.capacity_blocks, params.block_tokens, pending_s=0.0
        )

    def pick(self, cycle: CycleState, scored: list[Scored]) -> Scored:
        loads = [s.view.state.inflight for s in scored]
        lo, hi = min(loads), max(loads)
        if hi - lo > self.p.balance_abs_threshold and hi > self.p.balance_rel_threshold * lo:
            cycle.notes.append("sglang: load imbalanced, shortest queue")
            return _argmin(cycle, scored, [float(x) for x in loads])
        total = len(cycle.profile.block_hashes)
        if total:
            views = [s.view for s in scored]
            ratios = [m / total for m in self.matcher.matches(cycle, views)]
            best = max(ratios)
            if best > self.p.cache_threshold:
                return _argmin(cycle, scored, [-r for r in ratios])
        sizes = [self.matcher.index.size(s.view.name) for s in scored]
        small = min(sizes)
        keys = [float(x) if z == small else math.inf for x, z in zip(loads, sizes, strict=True)]
        return _argmin(cycle, scored, keys)

    def propose(self, cycle: CycleState, limit: int) -> list[str]:
        return self.matcher.propose(cycle, limit)

    def on_picked(self, cycle: CycleState, picked: EndpointView) -> None:
        self.matcher.learn(cycle, picked)


class DynamoParams(_IndexParams):
    overlap_weight: float = Field(1.0, ge=0, description="kv-overlap-score-weight")
    temperature: float = Field(0.0, ge=0, description="router-temperature; 0 = argmin")


@register("dynamo-kv")
class DynamoKv(Plugin):
    """Picker (NVIDIA Dynamo KV router), ignoring scores.

    ``cost = overlap_weight × prefill_blocks + decode_blocks`` with ``prefill_blocks =
    ceil(prompt ÷ block_tokens) - overlap_blocks`` (leading blocks cached on the endpoint:
    precise from KV events where available, Dynamo's default, else learned from picks) and
    ``decode_blocks = ceil(in-flight tokens ÷ block_tokens)`` (the router's active blocks).
    Temperature 0: the lowest cost, ties at random (seeded); otherwise softmax sampling of
    ``-cost ÷ max(cost) ÷ temperature``. Annotates ``dynamo_cost`` and ``prefix_match``.
    Source: ai-dynamo/dynamo ``docs/router/kv_cache_routing.md`` ("Cost Calculation", "Worker
    Selection"). Parameters: ``overlap_weight``, ``temperature``, ``mode``,
    ``capacity_blocks``, ``block_tokens``.
    """

    Params = DynamoParams

    def __init__(self, name: str, params: BaseModel) -> None:
        super().__init__(name, params)
        assert isinstance(params, DynamoParams)
        self.p = params
        self.matcher = PrefixMatcher(  # as the original: KV events only
            params.mode, params.capacity_blocks, params.block_tokens, pending_s=0.0
        )

    def pick(self, cycle: CycleState, scored: list[Scored]) -> Scored:
        bt = self.p.block_tokens
        prof = cycle.profile
        req_blocks = max(len(prof.block_hashes), -(-prof.prompt_tokens // bt))
        overlaps = self.matcher.matches(cycle, [s.view for s in scored])
        costs: list[float] = []
        for s, ov in zip(scored, overlaps, strict=True):
            decode = -(-s.view.state.inflight_tokens // bt)
            cost = self.p.overlap_weight * max(0, req_blocks - ov) + decode
            costs.append(cost)
            cycle.annotate(s.view.name, "dynamo_cost", cost)
            cycle.annotate(s.view.name, "prefix_match", float(ov))
        t = self.p.temperature
        if t <= 0:
            return _argmin(cycle, scored, costs)
        top = max(costs) or 1.0
        logits = [-c / top / t for c in costs]
        m = max(logits)
        weights = [math.exp(x - m) for x in logits]
        u = cycle.rng.random() * sum(weights)
        for s, w in zip(scored, weights, strict=True):
            u -= w
            if u <= 0:
                return s
        return scored[-1]

    def propose(self, cycle: CycleState, limit: int) -> list[str]:
        return self.matcher.propose(cycle, limit)

    def on_picked(self, cycle: CycleState, picked: EndpointView) -> None:
        self.matcher.learn(cycle, picked)


def _argmin(cycle: CycleState, scored: list[Scored], keys: list[float]) -> Scored:
    best = min(keys)
    top = [s for s, k in zip(scored, keys, strict=True) if k <= best]
    return top[0] if len(top) == 1 else cycle.rng.choice(top)
