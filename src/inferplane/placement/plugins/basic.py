"""The basic plugins: model-served, context-window and health filters; round-robin, random and
max-score pickers; the least-outstanding-requests scorer."""

from __future__ import annotations

from collections.abc import Sequence

from inferplane.fleet.state import EndpointView
from inferplane.placement.framework import (
    CycleState,
    FilterResult,
    MaxScorePicker,
    Plugin,
    Scored,
    register,
)


@register("model-served")
class ModelServed(Plugin):
    """Filter: keep endpoints that serve the requested model (and variant, when one is asked)
    through the request's API (an ``anthropic``-dialect endpoint carries chat only).

    Signals: the endpoint's static model list and dialect. Parameters: none.
    """

    per_endpoint = True

    def filter(self, cycle: CycleState, candidates: list[EndpointView]) -> FilterResult:
        p = cycle.profile
        kept: list[EndpointView] = []
        rejected: dict[str, str] = {}
        for c in candidates:
            m = c.endpoint.models.get(p.model)
            if m is None:
                rejected[c.name] = f"does not serve model {p.model!r}"
            elif p.variant is not None and m.variant != p.variant:
                rejected[c.name] = f"serves variant {m.variant!r}, not {p.variant!r}"
            elif p.api != "chat" and c.endpoint.spec.dialect != "openai":
                rejected[c.name] = f"{c.endpoint.spec.dialect} dialect has no {p.api} API"
            else:
                kept.append(c)
        return FilterResult(kept, rejected)


@register("context-window")
class ContextWindow(Plugin):
    """Filter: keep endpoints whose max context fits prompt + max output tokens.

    Signals: the served model's ``max_context``. Parameters: none.
    """

    per_endpoint = True

    def filter(self, cycle: CycleState, candidates: list[EndpointView]) -> FilterResult:
        p = cycle.profile
        need = p.prompt_tokens + (p.max_output_tokens if p.api != "embeddings" else 0)
        kept: list[EndpointView] = []
        rejected: dict[str, str] = {}
        for c in candidates:
            m = c.endpoint.models.get(p.model)
            if m is not None and need > m.max_context:
                rejected[c.name] = f"needs {need} tokens, max context {m.max_context}"
            else:
                kept.append(c)
        return FilterResult(kept, rejected)


@register("health")
class Health(Plugin):
    """Filter: drop endpoints whose ``/health`` failed or that were ejected as outliers.

    Signals: ``state.healthy``, ``state.ejected``. Parameters: none.
    """

    per_endpoint = True

    def filter(self, cycle: CycleState, candidates: list[EndpointView]) -> FilterResult:
        kept: list[EndpointView] = []
        rejected: dict[str, str] = {}
        for c in candidates:
            s = c.state
            if not s.healthy:
                rejected[c.name] = "failing /health"
            elif s.ejected:
                rejected[c.name] = f"ejected: {s.ejected_reason or 'outlier'}"
            else:
                kept.append(c)
        return FilterResult(kept, rejected)


@register("least-request")
class LeastRequest(Plugin):
    """Scorer: fewer outstanding requests is better.

    Formula: ``x = in-flight (gateway) + waiting (engine, when fresh)``;
    ``score = (max(x) - x) / (max(x) - min(x))``, 1.0 for all when equal. Parameters: none.
    """

    def score(self, cycle: CycleState, candidates: list[EndpointView]) -> Sequence[float]:
        xs = [c.state.inflight + c.state.queue_depth for c in candidates]
        lo, hi = min(xs), max(xs)
        if hi - lo <= 0:
            return [1.0] * len(xs)
        return [(hi - x) / (hi - lo) for x in xs]


@register("round-robin")
class RoundRobin(Plugin):
    """Picker: cycle through the candidates in endpoint order, ignoring scores.

    State: a counter kept by this instance. Parameters: none.
    """

    def __init__(self, name: str, params: object) -> None:
        super().__init__(name, params)  # type: ignore[arg-type]
        self._next = 0

    def pick(self, cycle: CycleState, scored: list[Scored]) -> Scored:
        ordered = sorted(scored, key=lambda s: s.view.endpoint.index)
        choice = ordered[self._next % len(ordered)]
        self._next += 1
        return choice


@register("random")
class RandomPick(Plugin):
    """Picker: uniform choice with the policy's seeded random source. Parameters: none."""

    def pick(self, cycle: CycleState, scored: list[Scored]) -> Scored:
        return cycle.rng.choice(scored)


register("max-score")(MaxScorePicker)
