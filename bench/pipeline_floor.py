"""bench/pipeline_floor: the lowest interactive P90 TTFT any placement or admission could reach
in `bench/pipeline.py`'s setup — the interactive requests' own prefill with every prefix hit the
trace allows.

For each interactive request of the slice (the class drawn by the simulator's seeded mix, as
`bench/pipeline.py` draws it; requests longer than the model's context are left out, as the
gateway refuses them), the longest prompt prefix it shares with any earlier request of the
slice, of any class, is taken as cached (whole engine blocks, never the last token: the most
any engine could hold for it), and the rest is prefilled alone on an idle engine of the fleet —
the roofline's step time, in chunks of the engine's ``max_num_batched_tokens``, each chunk at
the context before it. No queueing, no other request in the engine's steps: a request's TTFT on
this fleet is never below this. The P90 of these times is compared with the best baseline's
interactive P90 from a `bench/pipeline.py` results.json (``--results``; one per seed, ``{seed}``
in the path is replaced), against issue 13's target of 0.5x.

    python bench/pipeline_floor.py [--seeds 1,2,3] [--rate 6] [--duration 300]
        [--results docs/benchmarks/pipeline-s7/seed{seed}/results.json]

Deterministic (no simulation runs: only the slice, the mix's draw and the roofline).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline as P

from inferplane.config.loader import load_config
from inferplane.placement.build import build_policies
from inferplane.twin.simulator.mix import resolve_mix
from inferplane.twin.simulator.report import percentile
from inferplane.twin.simulator.simulator import Simulator
from inferplane.twin.traces.loader import load_trace, slice_trace
from inferplane.twin.traces.tokens import TRACE_BLOCK_TOKENS


def best_baseline_p90(path: Path, rate: float) -> tuple[str, float] | None:
    """The lowest interactive P90 TTFT among the baselines of a results.json at ``rate``."""
    if not path.exists():
        return None
    runs = json.loads(path.read_text("utf-8"))["runs"]
    best = [(r["per_class"]["interactive"]["ttft_s"]["p90"], r["_profile"]) for r in runs
            if r["_profile"] in P.BASELINES and r["_rate"] == rate]
    if not best:
        return None
    p90, name = min(best)
    return name, p90


def floor(seed: int, rate: float, duration: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        fleet = Path(d) / "h100x8-mix.yaml"
        fleet.write_text(P.fleet_text(P.MIX + P.ADMISSION).replace(
            "max_concurrency: 128", f"max_concurrency: {P.MAX_CONCURRENCY}"), "utf-8")
        config = load_config(fleet)
        reqs = slice_trace(load_trace(P.TRACE, "mooncake"), duration_s=duration, rate_scale=rate)
        policy = build_policies(config, str(fleet), seed=seed)[P.PRODUCT]
        sim = Simulator(config, policy, reqs, resolve_mix(config, None, "<mix>"), seed=seed,
                        admission=True, file=str(fleet))
    se = next(s for s in sim.endpoints if s.engine is not None and s.roofline is not None)
    assert se.engine is not None and se.roofline is not None
    roof, cfg = se.roofline, se.engine.config
    bs, chunk = cfg.block_size, cfg.max_num_batched_tokens
    largest = max(m.max_context for e in sim.fleet.endpoints for m in e.spec.models)

    def alone_s(uncached: int, cached: int) -> float:
        t = 0.0
        while uncached > 0:
            n = min(chunk, uncached)
            t += roof.step_time_s(n, cached, 0, 0)
            uncached -= n
            cached += n
        return t

    seen: list[tuple[list[int], int]] = []  # earlier prompts: trace block ids, prompt tokens
    times: list[float] = []
    for rec in sim.records:
        ids, prompt = list(rec.ids), rec.prompt_tokens
        if (rec.share.workload_class.name == "interactive"
                and prompt + rec.output_tokens <= largest):
            shared = 0
            for other, other_prompt in seen:
                k, m = 0, min(len(other), len(ids))
                while k < m and other[k] == ids[k]:
                    k += 1
                shared = max(shared, min(k * TRACE_BLOCK_TOKENS, other_prompt // bs * bs))
            cached = min(shared, (prompt - 1) // bs * bs)
            times.append(alone_s(prompt - cached, cached))
        seen.append((ids, prompt))
    times.sort()
    return {"seed": seed, "rate": rate, "interactive": len(times),
            "p50": percentile(times, 50), "p90": percentile(times, 90), "times": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--rate", type=float, default=6.0)
    ap.add_argument("--duration", type=float, default=300.0)
    ap.add_argument("--results", default=None,
                    help="a bench/pipeline.py results.json per seed ({seed} is replaced)")
    args = ap.parse_args()
    print("| seed | interactive requests | own prefill with every trace hit P50 / P90 s | best "
          "baseline P90 s | floor ÷ best | requests above 0.5× best | P90 ≤ 0.5× possible |")
    print("|---|---|---|---|---|---|---|")
    for seed in (int(s) for s in args.seeds.split(",")):
        f = floor(seed, args.rate, args.duration)
        best = None
        if args.results:
            best = best_baseline_p90(Path(args.results.format(seed=seed)), args.rate)
        if best is None:
            print(f"| {seed} | {f['interactive']} | {f['p50']:.3f} / {f['p90']:.3f} | — | — | — "
                  "| — |")
            continue
        name, p90 = best
        limit = 0.5 * p90
        above = sum(t > limit for t in f["times"])
        print(f"| {seed} | {f['interactive']} | {f['p50']:.3f} / {f['p90']:.3f} | {p90:.3f} "
              f"({name}) | {f['p90'] / p90:.3f} | {above} | "
              f"{'yes' if f['p90'] <= limit else 'no'} |")


if __name__ == "__main__":
    main()
