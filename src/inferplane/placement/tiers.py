"""Tiered model routing: pick the model that serves a request for a model alias.

An alias (``model_aliases`` in the fleet file) is served by several models — an 8B and a 70B,
or variants of one — listed cheapest first, each with a quality and optionally the largest
prompt it takes. Per request, the first rule matching the request's class, tenant and TTFT SLO
gives the policy: a quality floor (``min_quality``) and a preference (``cheapest``: the first
listed tier that qualifies; ``best``: the highest quality). A tier qualifies when it meets the
floor and takes the prompt. No rule: the cheapest tier that takes the prompt. Nothing
qualifies: the highest-quality tier that takes the prompt, else the highest-quality tier, and
the reason says so. Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from inferplane.config.schema import ModelAlias, ModelTier, TierRule


@dataclass(frozen=True, slots=True)
class TierChoice:
    """The model chosen for an alias and why (recorded in the decision)."""

    alias: str
    model: str
    reason: str


def _matches(
    rule: TierRule, workload_class: str, tenant: str, ttft_slo_s: float | None
) -> bool:
    if rule.classes is not None and workload_class not in rule.classes:
        return False
    if rule.tenants is not None and tenant not in rule.tenants:
        return False
    if rule.max_ttft_slo_ms is not None:
        return ttft_slo_s is not None and ttft_slo_s * 1000.0 <= rule.max_ttft_slo_ms
    return True


def choose_tier(
    alias: ModelAlias,
    *,
    workload_class: str,
    tenant: str,
    prompt_tokens: int,
    ttft_slo_s: float | None,
) -> TierChoice:
    """The tier for one request (module docstring)."""
    rule_no, rule = next(
        (
            (i, r)
            for i, r in enumerate(alias.rules)
            if _matches(r, workload_class, tenant, ttft_slo_s)
        ),
        (None, None),
    )
    floor = rule.min_quality if rule is not None and rule.min_quality is not None else None
    prefer = rule.prefer if rule is not None else "cheapest"

    def fits(t: ModelTier) -> bool:
        return t.max_prompt_tokens is None or prompt_tokens <= t.max_prompt_tokens

    ok = [t for t in alias.tiers if fits(t) and (floor is None or t.quality >= floor)]
    why = [f"rule {rule_no} ({_describe(rule)})" if rule is not None else "no rule"]
    if floor is not None:
        why.append(f"quality ≥ {floor:g}")
    why.append(f"prompt {prompt_tokens} tokens")
    if ok:
        pick = ok[0] if prefer == "cheapest" else max(ok, key=lambda t: t.quality)
        why.append(f"{prefer} of {len(ok)} qualifying tier{'s' if len(ok) > 1 else ''}")
    else:
        fitting = [t for t in alias.tiers if fits(t)] or list(alias.tiers)
        pick = max(fitting, key=lambda t: t.quality)
        why.append("no tier qualifies: the best that takes the prompt")
    return TierChoice(alias.name, pick.model, f"{alias.name} → {pick.model}: " + "; ".join(why))


def _describe(rule: TierRule) -> str:
    parts = []
    if rule.classes is not None:
        parts.append("class " + "|".join(rule.classes))
    if rule.tenants is not None:
        parts.append("tenant " + "|".join(rule.tenants))
    if rule.max_ttft_slo_ms is not None:
        parts.append(f"TTFT SLO ≤ {rule.max_ttft_slo_ms:g} ms")
    return ", ".join(parts) or "any request"
