"""What-if: two `inferplane simulate` reports of one trace — the fleet as it is and as it
might be — side by side, with the delta in cost, unit cost, SLO attainment and spillovers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: (label, how to read it from a report) for every compared figure.
_ROWS: tuple[tuple[str, str], ...] = (
    ("requests", "requests"),
    ("completed", "completed"),
    ("rejected", "rejected"),
    ("cost USD", "cost_usd"),
    ("USD per 1M tokens", "usd_per_mtok"),
    ("SLO attainment", "slo_attainment"),
    ("TTFT P90 s", "ttft_p90"),
    ("spillovers", "spillovers"),
    ("sovereignty violations", "sovereignty_violations"),
)


def figures(report: Mapping[str, Any]) -> dict[str, float | None]:
    """The compared figures of one simulate report."""
    tokens = (report.get("prompt_tokens") or 0) + (report.get("output_tokens") or 0)
    cost = report.get("cost_usd")
    ttft = report.get("ttft_s") or {}
    out: dict[str, float | None] = {
        key: _num(report.get(key))
        for key in ("requests", "completed", "rejected", "cost_usd", "slo_attainment",
                    "spillovers", "sovereignty_violations")
    }
    out["usd_per_mtok"] = cost / tokens * 1e6 if isinstance(cost, int | float) and tokens else None
    out["ttft_p90"] = _num(ttft.get("p90")) if isinstance(ttft, dict) else None
    return out


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def compare(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """A table: each figure before, after, and the change."""
    a, b = figures(before), figures(after)
    lines = [f"{'':<24}{'before':>14}{'after':>14}  change"]
    for label, key in _ROWS:
        x, y = a[key], b[key]
        if x is None and y is None:
            continue
        change = "-"
        if x is not None and y is not None:
            change = f"{y - x:+,.4g}"
            if x and key not in ("slo_attainment",):
                change += f" ({(y - x) / abs(x):+.0%})"
        lines.append(f"{label:<24}{_fmt(x):>14}{_fmt(y):>14}  {change}")
    subs = sorted(set(before.get("per_substrate") or {}) | set(after.get("per_substrate") or {}))
    if subs:
        lines.append("requests per substrate:")
        for s in subs:
            x = (before.get("per_substrate") or {}).get(s, 0)
            y = (after.get("per_substrate") or {}).get(s, 0)
            lines.append(f"  {s:<22}{x:>14,}{y:>14,}  {y - x:+,}")
    return lines


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v == int(v) and abs(v) >= 1 else f"{v:.4g}"
