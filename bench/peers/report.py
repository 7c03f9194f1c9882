"""Rendering the results: ``results.md`` tables, ``results.png`` and the docs section."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _f(v: Any, fmt: str = ".0f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, fmt)
    return str(v)


def main_table(results: Sequence[Mapping[str, Any]]) -> str:
    """One row per router: latency percentiles (ms), errors, throughput, hit rate, SLO, CPU."""
    head = ("| router | policy | version | prompt form | TTFT p50 | TTFT p90 | TTFT p99 | "
            "ITL p50 | ITL p99 | E2E p50 | E2E p99 | errors | out tok/s | hit rate | SLO | "
            "router CPU s | peak RSS MB |")
    lines = [head, "|" + "---|" * 17]
    for r in results:
        s = r.get("summary")
        if not s:
            reason = str(r.get("reason") or "").strip().splitlines()
            lines.append(f"| {r['peer']} | {r['policy']} | {_f(r.get('version'))} | "
                         f"{r['form']} | {r.get('status', '-')}: {reason[0][:90] if reason else ''}"
                         + " |" * 13)
            continue
        hr = r.get("hit_rate")
        slo = s.get("slo_attainment")
        lines.append(
            f"| {r['peer']} | {r['policy']} | {_f(r.get('version'))} | {r['form']} | "
            f"{_f(s['ttft_ms']['p50'])} | {_f(s['ttft_ms']['p90'])} | {_f(s['ttft_ms']['p99'])} | "
            f"{_f(s['itl_ms']['p50'], '.1f')} | {_f(s['itl_ms']['p99'], '.1f')} | "
            f"{_f(s['e2e_ms']['p50'])} | {_f(s['e2e_ms']['p99'])} | "
            f"{s['errors']}/{s['requests']} | {_f(s['throughput_tok_s'])} | "
            f"{'-' if hr is None else f'{hr:.1%}'} | {'-' if slo is None else f'{slo:.1%}'} | "
            f"{_f(r.get('cpu_s'), '.1f')} | {_f(r.get('peak_rss_mb'), '.0f')} |")
    return "\n".join(lines)


def overhead_table(results: Sequence[Mapping[str, Any]]) -> str:
    """Added latency (router − direct, ms) per router and mode; first chunk where streaming."""
    head = ("| router | policy | mode | stream | n | direct p50 | router p50 | **added p50** | "
            "added p99 | first-chunk added p50 | first-chunk added p99 |")
    lines = [head, "|" + "---|" * 11]
    for r in results:
        for o in r.get("overhead") or []:
            if "error" in o or "skipped" in o:
                lines.append(f"| {r['peer']} | {r['policy']} | {o['mode']} | {o['stream']} | "
                             f"{o.get('error') or o.get('skipped')} |" + " |" * 6)
                continue
            lines.append(
                f"| {r['peer']} | {r['policy']} | {o['mode']} | {o['stream']} | {o['n']} | "
                f"{_f(o['direct_total_p50_ms'], '.2f')} | {_f(o['router_total_p50_ms'], '.2f')} | "
                f"**{_f(o['added_total_p50_ms'], '.2f')}** | "
                f"{_f(o['added_total_p99_ms'], '.2f')} | "
                f"{_f(o.get('added_first_p50_ms'), '.2f')} | "
                f"{_f(o.get('added_first_p99_ms'), '.2f')} |")
    return "\n".join(lines)


def reuse_artefacts(results: Sequence[Mapping[str, Any]], threshold_ms: float = 20.0) -> list[str]:
    """Routers whose first chunk is much later on reused connections than on fresh ones."""
    notes = []
    for r in results:
        rows = {(o["mode"], o["stream"]): o for o in r.get("overhead") or []
                if "error" not in o and "skipped" not in o}
        reused, fresh = rows.get(("seq", True)), rows.get(("seq-fresh", True))
        if not reused or not fresh:
            continue
        a, b = reused.get("router_first_p50_ms"), fresh.get("router_first_p50_ms")
        if a is not None and b is not None and a - b > threshold_ms:
            notes.append(f"{r['name']}: first chunk p50 {a:.1f} ms on reused connections vs "
                         f"{b:.1f} ms on fresh ones (+{a - b:.1f} ms)")
    return notes


def plot(results: Sequence[Mapping[str, Any]], path: Path, title: str) -> bool:
    """TTFT p50/p90/p99 bars per router (log scale) and the fleet's prefix hit rate."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    done = [r for r in results if r.get("summary")]
    if not done:
        return False
    names = [r["name"] for r in done]
    x = list(range(len(done)))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8.0, 1.1 * len(done)), 8), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    w = 0.27
    for i, (q, color) in enumerate((("p50", "#4c72b0"), ("p90", "#dd8452"), ("p99", "#c44e52"))):
        vals = [r["summary"]["ttft_ms"][q] or 0.0 for r in done]
        ax1.bar([xi + (i - 1) * w for xi in x], vals, w, label=f"TTFT {q}", color=color)
    ax1.set_yscale("log")
    ax1.set_ylabel("TTFT (ms, log)")
    ax1.legend()
    ax1.set_title(title, fontsize=9)
    ax1.grid(axis="y", alpha=0.3)
    ax2.bar(x, [100 * (r.get("hit_rate") or 0.0) for r in done], 0.6, color="#55a868")
    ax2.set_ylabel("prefix hit %")
    ax2.set_xticks(x)
    ax2.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
