"""The simulator's report: the JSON contract, the sovereignty check and a
human table.

JSON keys (times in seconds; percentiles ``null`` when there is no sample):

- ``requests``, ``completed``, ``rejected`` (refused by admission, or no eligible endpoint),
  ``failed`` (placed, then lost to an upstream failure), ``unfinished``; ``rejected_by``
  {filter, ``admission: <code>`` or ``engine: …``: rejected requests}; ``errors`` {OpenAI
  error code: requests}; ``shed`` (answered 429 by admission: load or retry shedding, rate
  limits, budgets); ``deferred`` (batch requests that waited in the batch lane)
- ``goodput_rps``: requests meeting their class's SLO (below) per second of ``offered_s`` (first
  to last arrival: the same window for every policy on one slice, however long deferred work
  drains after it)
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
- ``per_class`` {class: {requests, completed, rejected, shed, deferred, failed, ttft_s {p50,
  p90, p99}, slo_attainment, goodput_rps}}; ``per_tenant`` {tenant: {requests, completed, shed,
  ttft_s {p50, p90, p99}}}
- the run: ``profile``, ``fleet``, ``trace``, ``rate_scale``, ``seed``, ``admission`` (the
  admission stage ran), ``faults`` (scheduled fault events), ``faults_applied`` (those that
  fell within the run: one scheduled after the replayed slice ended is never applied),
  ``wall_s``
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
    admission: bool = False,
    faults: int = 0,
    faults_applied: int | None = None,
) -> dict[str, Any]:
    """The JSON report of a finished simulation (see the module docstring for the keys)."""
    recs = records
    done = [r for r in recs if r.completed]
    rejected = [r for r in recs if r.rejected]
    failed = [r for r in recs if r.failed]
    errors = Counter(r.error_code for r in recs if r.error_code is not None)
    rejected_by: Counter[str] = Counter()
    for r in rejected:
        rejected_by.update(r.rejected_by)
    prompt = sum(r.prompt_tokens for r in done)
    cached = sum(r.cached_tokens for r in done)
    output = sum(r.completion_tokens for r in done)
    start = recs[0].arrival_s if recs else 0.0
    span = max(0.0, end_s - start)
    # goodput is per second of offered traffic (first to last arrival): the same window for
    # every policy replaying the same slice, however long its deferred work drains afterwards
    offered = recs[-1].arrival_s - start if recs else 0.0
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
        good = sum(1 for r in mine if r.meets_slo())
        per_class[name] = {
            "requests": len(mine),
            "completed": sum(1 for r in mine if r.completed),
            "rejected": sum(1 for r in mine if r.rejected),
            "shed": sum(1 for r in mine if r.shed),
            "deferred": sum(1 for r in mine if r.deferred),
            "failed": sum(1 for r in mine if r.failed),
            "ttft_s": {q: percentile(ttfts, n) for q, n in (("p50", 50), ("p90", 90), ("p99", 99))},
            "slo_attainment": _slo_fraction(mine),
            "goodput_rps": good / offered if offered > 0 else None,
        }
    per_tenant: dict[str, Any] = {}
    for name in sorted({r.share.tenant for r in recs}):
        mine = [r for r in recs if r.share.tenant == name]
        ttfts = sorted(r.ttft_s for r in mine if r.ttft_s is not None)
        per_tenant[name] = {
            "requests": len(mine),
            "completed": sum(1 for r in mine if r.completed),
            "shed": sum(1 for r in mine if r.shed),
            "ttft_s": {q: percentile(ttfts, n) for q, n in (("p50", 50), ("p90", 90), ("p99", 99))},
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
        "failed": len(failed),
        "unfinished": len(recs) - len(done) - len(rejected) - len(failed),
        "rejected_by": dict(sorted(rejected_by.items())),
        "shed": sum(1 for r in recs if r.shed),
        "deferred": sum(1 for r in recs if r.deferred),
        "errors": dict(sorted(errors.items())),
        "goodput_rps": sum(1 for r in recs if r.meets_slo()) / offered if offered > 0 else None,
        "offered_s": offered,
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
        "per_tenant": per_tenant,
        "admission": admission,
        "faults": faults,
        "faults_applied": faults if faults_applied is None else faults_applied,
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
            "requests / completed / rejected / failed",
            f"{report['requests']} / {report['completed']} / {report['rejected']}"
            f" / {report.get('failed', 0)}",
        ),
        ("shed (429) / deferred", f"{report.get('shed', 0)} / {report.get('deferred', 0)}"),
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
    if report.get("per_class"):
        cls = Table(title="per class")
        for col in ("class", "requests", "goodput/s", "TTFT p50 / p90 / p99 (ms)", "shed",
                    "deferred", "failed"):
            cls.add_column(col, justify="left" if col == "class" else "right")
        for name, c in report["per_class"].items():
            t = c["ttft_s"]
            good = c.get("goodput_rps")
            cls.add_row(
                name,
                str(c["requests"]),
                f"{good:.2f}" if good is not None else "-",
                " / ".join(_ms(t.get(k)) for k in ("p50", "p90", "p99")),
                str(c.get("shed", 0)),
                str(c.get("deferred", 0)),
                str(c.get("failed", 0)),
            )
        console.print(cls)
