"""bench/placement: every placement profile on the same trace, through `inferplane simulate`.

Part 1 (h100x8, cache-affinity ground): replays a slice of the Mooncake conversation trace at
rate scales from light load to past the knee, for every shipped profile; reports TTFT
p50/p90/p99, SLO attainment, prefix hit rate and throughput. The knee is the lowest rate scale at
which the best baseline's P90 TTFT exceeds twice its P90 at the lightest rate.

Part 2 (hetero, multi-substrate ground): the same slice on the hetero fleet with its traffic mix
(a sovereign tenant included), `default` against the cost-blind `least-request`: sovereignty
violations, spillovers, cost per million tokens and SLO attainment.

    python bench/placement.py [--duration 600] [--rates 1,2,4,5,6,7,8] [--workers 2]
                              [--out docs/benchmarks/placement]

Writes results.json, results.md and placement.png into --out and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# /work/shared/traces from the main checkout (/work/main) or a worktree (/work/wt/NAME)
TRACE = next((p / "shared" / "traces" / "mooncake_conversation.jsonl"
              for p in (ROOT.parent, ROOT.parent.parent)
              if (p / "shared" / "traces" / "mooncake_conversation.jsonl").exists()),
             ROOT.parent / "shared" / "traces" / "mooncake_conversation.jsonl")
PROFILES = ["default", "round-robin", "least-request", "gie-default", "llmd-token-aware",
            "sglang-cache-aware", "dynamo-kv"]
BASELINES = [p for p in PROFILES if p != "default"]


def run(job: tuple[str, str, float, float, int]) -> dict[str, Any]:
    from inferplane.twin.simulator.simulator import run_simulation

    fleet, profile, rate, duration, seed = job
    r = run_simulation(fleet, str(TRACE), profile, format="mooncake", rate_scale=rate, seed=seed,
                       mix=None, duration_s=duration, limit=None)
    r["_fleet"], r["_profile"], r["_rate"] = fleet, profile, rate
    return r


def knee(results: dict[tuple[str, float], dict[str, Any]], rates: list[float]) -> float | None:
    light = min(rates)
    base = {p: results[(p, light)]["ttft_s"]["p90"] for p in BASELINES}
    for rate in sorted(rates):
        best = min(results[(p, rate)]["ttft_s"]["p90"] for p in BASELINES)
        if best > 2 * min(base.values()):
            return rate
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0, help="trace seconds replayed")
    ap.add_argument("--rates", default="1,2,4,5,6,7,8")
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "placement")
    args = ap.parse_args()
    rates = [float(x) for x in args.rates.split(",")]
    profiles = args.profiles.split(",")
    h100 = str(ROOT / "examples" / "fleets" / "h100x8.yaml")
    hetero = str(ROOT / "examples" / "fleets" / "hetero.yaml")
    jobs = [(h100, p, r, args.duration, args.seed) for r in rates for p in profiles]
    jobs += [(hetero, p, 1.0, args.duration, args.seed) for p in ("default", "least-request")]
    t0 = time.monotonic()
    with ProcessPoolExecutor(args.workers) as ex:
        out = list(ex.map(run, jobs))
    wall = time.monotonic() - t0
    res = {(r["_profile"], r["_rate"]): r for r in out if r["_fleet"] == h100}
    het = {r["_profile"]: r for r in out if r["_fleet"] == hetero}
    k = knee(res, rates) if set(BASELINES) <= set(profiles) else None

    lines = [
        f"Command: `python bench/placement.py --duration {args.duration:g} --rates {args.rates}`"
        f" — {date.today()}, {platform.node()} ({os.cpu_count()} cores), Python "
        f"{platform.python_version()}, {wall:.0f} s wall. Trace: first {args.duration:g} s of "
        f"the Mooncake conversation trace ({out[0]['requests']} requests), seed {args.seed}.",
        "",
        "| rate | profile | TTFT p50 s | TTFT p90 s | TTFT p99 s | SLO attainment | prefix hit "
        "| output tok/s | completed | rejected |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rate in rates:
        for p in profiles:
            r = res[(p, rate)]
            t = r["ttft_s"]
            name = f"**{p}**" if p == "default" else p
            lines.append(
                f"| ×{rate:g} | {name} | {t['p50']:.3f} | {t['p90']:.3f} | {t['p99']:.3f} | "
                f"{r['slo_attainment']:.3f} | {r['prefix_hit_rate']:.3f} | "
                f"{r['output_tokens_per_s']:.0f} | {r['completed']} | {r['rejected']} |")
    lines.append("")
    if k is not None and "default" in profiles:
        best_p = min(BASELINES, key=lambda p: res[(p, k)]["ttft_s"]["p90"])
        best_slo = max(res[(p, k)]["slo_attainment"] for p in BASELINES)
        d, b = res[("default", k)], res[(best_p, k)]
        lines.append(
            f"Knee (best baseline's P90 > 2× the lightest rate's): **×{k:g}**. There, default "
            f"P90 TTFT {d['ttft_s']['p90']:.3f} s vs best baseline {best_p} "
            f"{b['ttft_s']['p90']:.3f} s = **{d['ttft_s']['p90'] / b['ttft_s']['p90']:.2f}×** "
            f"(target ≤ 0.5×); SLO attainment {d['slo_attainment']:.3f} vs best baseline "
            f"{best_slo:.3f}; throughput {d['output_tokens_per_s']:.0f} vs "
            f"{b['output_tokens_per_s']:.0f} tok/s.")
        lines.append("")
    if het:
        lines += [
            "Hetero fleet (`examples/fleets/hetero.yaml`, its traffic mix incl. the sovereign "
            "tenant), rate ×1:", "",
            "| profile | SLO attainment | TTFT p90 s | cost USD | USD per M tokens | spillovers "
            "| sovereignty violations | per substrate |", "|---|---|---|---|---|---|---|---|"]
        for p, r in het.items():
            toks = r.get("prompt_tokens", 0) + r.get("output_tokens", 0)
            per_m = r["cost_usd"] / toks * 1e6 if toks else float("nan")
            subs = ", ".join(f"{s} {n}" for s, n in sorted(r["per_substrate"].items()))
            lines.append(
                f"| {p} | {r['slo_attainment']:.3f} | {r['ttft_s']['p90']:.3f} | "
                f"{r['cost_usd']:.2f} | {per_m:.3f} | {r['spillovers']} | "
                f"{r['sovereignty_violations']} | {subs} |")
        lines.append("")
    md = "\n".join(lines)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(md + "\n")
    (args.out / "results.json").write_text(json.dumps(out, indent=1, default=str))
    plot(res, rates, profiles, args.out / "placement.png")


def plot(res: dict[tuple[str, float], dict[str, Any]], rates: list[float], profiles: list[str],
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for p in profiles:
        style = {"linewidth": 3, "color": "black"} if p == "default" else {"linewidth": 1.3}
        xs = rates
        axes[0].plot(xs, [res[(p, r)]["ttft_s"]["p90"] for r in xs], marker="o", label=p, **style)
        axes[1].plot(xs, [res[(p, r)]["slo_attainment"] for r in xs], marker="o", **style)
        axes[2].plot(xs, [res[(p, r)]["prefix_hit_rate"] for r in xs], marker="o", **style)
    axes[0].set_yscale("log")
    axes[0].set_title("P90 TTFT (s, log)")
    axes[1].set_title("SLO attainment (TTFT ≤ 1 s, ITL ≤ 100 ms)")
    axes[2].set_title("prefix-cache hit rate")
    for a in axes:
        a.set_xlabel("rate scale (× trace arrival rate)")
        a.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("inferplane simulate — Mooncake conversation slice on h100x8")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
