"""The simulator's report: the JSON contract, the sovereignty check and a
human table.

JSON keys (times in seconds; percentiles ``null`` when there is no sample):

- ``requests``, ``completed``, ``rejected``, ``unfinished``; ``rejected_by`` {filter or
  ``engine: …``: rejected requests it removed endpoints for}
- ``ttft_s`` {p50, p90, p99, mean} and ``e2e_s`` {p50, p90, p99, mean} over completed requests,
  as the client sees them (network delay included)
- ``itl_s`` {p50, p90, p99, mean}: over every inter-token gap (token-weighted, as vLLM's
  ``benchmark_serving`` reports ITL)
- ``slo_attainment``: fraction of *all* requests completed within their class's TTFT SLO and
  with a mean gap within its ITL SLO (classes without an SLO only need to complete; rejected
  requests miss)
- ``prefix_hit_rate``: prompt tokens served from an engine's prefix cache / prompt tokens,
  over completed requests; ``prompt_tokens``, ``cached_prompt_tokens``, ``output_tokens``
- ``output_tokens_per_s``: output tokens / ``sim_duration_s`` (first arrival to last finish)
- ``cost_usd``: per request as the gateway's ledger prices it (per-token, or an hourly rate
  amortised over ``max_concurrency`` slots for the request's duration)
- ``per_substrate`` / ``per_endpoint`` {name: requests placed}; ``spillovers``; ``preemptions``
- ``sovereignty_violations``: completed requests served outside their tenant's allowed
  jurisdictions, recomputed from the config, independently of placement
- ``per_class`` {class: {requests, completed, rejected, ttft_s {p50, p99}, slo_attainment}}
- the run: ``profile``, ``fleet``, ``trace``, ``rate_scale``, ``seed``, ``wall_s``
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferplane.config.schema import FleetConfig
from inferplane.twin.simulator.records import RequestRecord

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "build_report",
    "percentile",
    "print_report",
    "sovereignty_violations",
    "weighted_percentile",
    "write_json_atomic",
]


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default) of sorted values; None when empty."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def weighted_percentile(counts: Mapping[float, int], q: float) -> float | None:
    """Nearest-rank percentile of values given with their multiplicities."""
    total = sum(counts.values())
    if total <= 0:
        return None
    rank = max(1, math.ceil(q / 100.0 * total))
    seen = 0
    for v in sorted(counts):
        seen += counts[v]
        if seen >= rank:
            return v
    return max(counts)  # pragma: no cover - rank <= total


def _dist(values: Iterable[float], qs: Sequence[int] = (50, 90, 99)) -> dict[str, float | None]:
    s = sorted(values)
    out: dict[str, float | None] = {f"p{q}": percentile(s, q) for q in qs}
    out["mean"] = sum(s) / len(s) if s else None
    return out


def sovereignty_violations(config: FleetConfig, served: Iterable[tuple[str, str]]) -> int:
    """Count ``(tenant, endpoint)`` services outside the tenant's allowed jurisdictions.

    Reads only the config (tenants' ``allowed_jurisdictions``, substrates' ``jurisdiction``),
    never a placement decision, so it checks placement rather than repeating it.
    """
    allowed = {
        t.name: set(t.allowed_jurisdictions)
        for t in config.tenants
        if t.allowed_jurisdictions is not None
    }
    where = {e.name: s.jurisdiction for s in config.substrates for e in s.endpoints}
    return sum(
        1 for tenant, ep in served if tenant in allowed and where.get(ep) not in allowed[tenant]
    )


def _slo_fraction(records: Sequence[RequestRecord]) -> float | None:
    return sum(1 for r in records if r.meets_slo()) / len(records) if records else None


def build_report(
    records: Sequence[RequestRecord],
    *,
    config: FleetConfig,
    end_s: float,
    itl_gaps: Mapping[float, int],
    profile: str,
    fleet: str,
    trace: str,
    rate_scale: float,
    seed: int,
    wall_s: float,
) -> dict[str, Any]:
    """The JSON report of a finished simulation (see the module docstring for the keys)."""
    recs = records
    done = [r for r in recs if r.completed]
    rejected = [r for r in recs if r.rejected]
    rejected_by: Counter[str] = Counter()
    for r in rejected:
        rejected_by.update(r.rejected_by)
    prompt = sum(r.prompt_tokens for r in done)
    cached = sum(r.cached_tokens for r in done)
    output = sum(r.completion_tokens for r in done)
    start = recs[0].arrival_s if recs else 0.0
    span = max(0.0, end_s - start)
    per_endpoint = Counter(r.endpoint for r in recs if r.endpoint is not None)
    per_substrate = Counter(r.substrate for r in recs if r.substrate is not None)
    gaps = itl_gaps
    itl: dict[str, float | None] = {f"p{q}": weighted_percentile(gaps, q) for q in (50, 90, 99)}
    n_gaps = sum(gaps.values())
    itl["mean"] = sum(g * n for g, n in gaps.items()) / n_gaps if n_gaps else None
    per_class: dict[str, Any] = {}
    for name in sorted({r.share.workload_class.name for r in recs}):
        mine = [r for r in recs if r.share.workload_class.name == name]
        ttfts = sorted(r.ttft_s for r in mine if r.ttft_s is not None)
        per_class[name] = {
            "requests": len(mine),
            "completed": sum(1 for r in mine if r.completed),
            "rejected": sum(1 for r in mine if r.rejected),
            "ttft_s": {"p50": percentile(ttfts, 50), "p99": percentile(ttfts, 99)},
            "slo_attainment": _slo_fraction(mine),
        }
    return {
        "profile": profile,
        "fleet": fleet,
        "trace": trace,
        "rate_scale": rate_scale,
        "seed": seed,
        "requests": len(recs),
        "completed": len(done),
        "rejected": len(rejected),
        "unfinished": len(recs) - len(done) - len(rejected),
        "rejected_by": dict(sorted(rejected_by.items())),
        "ttft_s": _dist(r.ttft_s for r in done if r.ttft_s is not None),
        "itl_s": itl,
        "e2e_s": _dist(r.e2e_s for r in done if r.e2e_s is not None),
        "slo_attainment": _slo_fraction(recs),
        "prefix_hit_rate": cached / prompt if prompt else None,
        "prompt_tokens": prompt,
        "cached_prompt_tokens": cached,
        "output_tokens": output,
        "sim_duration_s": span,
        "output_tokens_per_s": output / span if span > 0 else None,
        "cost_usd": sum(r.cost_usd for r in done),
        "per_substrate": dict(sorted(per_substrate.items())),
        "per_endpoint": dict(sorted(per_endpoint.items())),
        "spillovers": sum(1 for r in recs if r.spillover),
        "preemptions": sum(r.preemptions for r in done),
        "sovereignty_violations": sovereignty_violations(
            config, ((r.share.tenant, r.endpoint) for r in done if r.endpoint is not None)
        ),
        "per_class": per_class,
        "wall_s": wall_s,
    }


def write_json_atomic(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as JSON to a temporary file beside ``path``, then rename it into place."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _ms(v: object) -> str:
    return f"{v * 1000:.1f}" if isinstance(v, int | float) else "-"


def print_report(report: Mapping[str, Any], console: Console | None = None) -> None:
    """A short human summary of ``report`` (rich tables)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    head = Table(title=f"simulate: {report['profile']} on {report['fleet']}", show_header=False)
    head.add_column("metric")
    head.add_column("value", justify="right")
    slo, hit = report["slo_attainment"], report["prefix_hit_rate"]
    rows = [
        (
            "requests / completed / rejected",
            f"{report['requests']} / {report['completed']} / {report['rejected']}",
        ),
        (
            "TTFT p50 / p90 / p99 (ms)",
            " / ".join(_ms(report["ttft_s"][k]) for k in ("p50", "p90", "p99")),
        ),
        ("ITL p50 / p99 (ms)", " / ".join(_ms(report["itl_s"][k]) for k in ("p50", "p99"))),
        (
            "E2E p50 / p99 (s)",
            " / ".join(
                f"{v:.2f}" if v is not None else "-"
                for v in (report["e2e_s"]["p50"], report["e2e_s"]["p99"])
            ),
        ),
        ("SLO attainment", f"{slo:.1%}" if slo is not None else "-"),
        ("prefix hit rate", f"{hit:.1%}" if hit is not None else "-"),
        ("output tokens/s", f"{report['output_tokens_per_s'] or 0:.0f}"),
        ("cost (USD)", f"{report['cost_usd']:.2f}"),
        (
            "spillovers / sovereignty violations",
            f"{report['spillovers']} / {report['sovereignty_violations']}",
        ),
        ("simulated / wall (s)", f"{report['sim_duration_s']:.0f} / {report['wall_s']:.1f}"),
    ]
    for k, v in rows:
        head.add_row(k, v)
    console.print(head)
    if report["per_substrate"]:
        subs = Table(title="per substrate")
        subs.add_column("substrate")
        subs.add_column("requests", justify="right")
        for name, n in report["per_substrate"].items():
            subs.add_row(name, str(n))
        console.print(subs)
    if report["rejected_by"]:
        console.print(
            "rejected by: " + ", ".join(f"{k} ({n})" for k, n in report["rejected_by"].items())
        )
