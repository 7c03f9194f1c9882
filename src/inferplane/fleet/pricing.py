"""What a request costs on a substrate.

Per-token pricing: ``prompt × input + cached × cached_input + completion × output`` (USD per
million tokens). Hourly pricing (reserved or burst hardware) is amortised: an endpoint serving
``max_concurrency`` requests at once for ``hourly_usd`` charges each request
``hourly_usd / 3600 × seconds / max_concurrency``; for a prediction, ``seconds`` is estimated
from the physics model.
"""

from __future__ import annotations

from inferplane.config.schema import CostModel


def token_cost_usd(
    cost: CostModel, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
) -> float | None:
    """Cost under per-token prices, or None for an hourly-priced substrate."""
    if cost.hourly_usd is not None:
        return None
    inp = cost.input_per_mtok or 0.0
    cached_price = cost.cached_input_per_mtok if cost.cached_input_per_mtok is not None else inp
    uncached = max(0, prompt_tokens - cached_tokens)
    return (
        uncached * inp
        + cached_tokens * cached_price
        + completion_tokens * (cost.output_per_mtok or 0.0)
    ) / 1e6


def amortised_cost_usd(cost: CostModel, seconds: float, max_concurrency: int) -> float | None:
    """Share of an hourly rate for a request occupying one of ``max_concurrency`` slots."""
    if cost.hourly_usd is None:
        return None
    return cost.hourly_usd / 3600.0 * seconds / max(1, max_concurrency)


def request_cost_usd(
    cost: CostModel,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    seconds: float = 0.0,
    max_concurrency: int = 1,
) -> float:
    """Actual cost of a finished request under either pricing form."""
    c = token_cost_usd(cost, prompt_tokens, completion_tokens, cached_tokens)
    if c is not None:
        return c
    return amortised_cost_usd(cost, seconds, max_concurrency) or 0.0
