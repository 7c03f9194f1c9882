"""The rate-limit filter: an upstream's declared requests and tokens per minute are capacity."""

from __future__ import annotations

from inferplane.fleet.state import EndpointView
from inferplane.placement.framework import CycleState, FilterResult, Plugin, register
from inferplane.placement.plugins.constraints import SATURATED_KEY


def rate_limit_reason(c: EndpointView, need: int) -> str | None:
    """Why ``c``'s provider limits leave no room for a request of ``need`` tokens, or None.
    `RateLimit` and the fused filter pass both ask this."""
    s = c.state
    if s.requests_left is not None and s.requests_left < 1:
        return f"rate limit: {c.endpoint.spec.limits.requests_per_min} requests/min used"
    if s.tokens_left is not None and s.tokens_left < need:
        tpm = c.endpoint.spec.limits.tokens_per_min
        return f"rate limit: {s.tokens_left} of {tpm} tokens/min left, needs {need}"
    return None


@register("rate-limit")
class RateLimit(Plugin):
    """Filter: remove endpoints whose declared rate limits leave no room for this request.

    Rule: with ``requests_left`` / ``tokens_left`` the room under the endpoint's declared
    ``limits.requests_per_min`` / ``tokens_per_min`` in the rolling minute (what the gateway sent
    it, prompt + max output tokens a request), an endpoint is removed when ``requests_left < 1``
    or ``tokens_left < prompt_tokens + max output tokens``. Endpoints without declared limits
    pass. Removed endpoints are listed under ``cycle.data["saturated"]`` like the saturation
    filter's, so a pick outside the preferred pool is evidenced as spillover. Signals:
    ``state.requests_left``, ``state.tokens_left``. Parameters: none.
    """

    per_endpoint = True

    def filter(self, cycle: CycleState, candidates: list[EndpointView]) -> FilterResult:
        p = cycle.profile
        need = p.prompt_tokens + p.max_total_output_tokens
        kept: list[EndpointView] = []
        rejected: dict[str, str] = {}
        limited: list[EndpointView] = []
        for c in candidates:
            reason = rate_limit_reason(c, need)
            if reason is None:
                kept.append(c)
            else:
                rejected[c.name] = reason
                limited.append(c)
        if limited:
            cycle.data.setdefault(SATURATED_KEY, []).extend(limited)
        return FilterResult(kept, rejected)
