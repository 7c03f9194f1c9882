"""A/B of cache-placement variants of the `default` profile in the simulator, over several
windows of the Mooncake conversation trace (h100x8), side by side with a cache-aware baseline.

    python bench/cache_placement.py [--windows 3] [--window-s 400] [--rates 1,6,7]
                                    [--variants fastest,score,score+room-size,...]
                                    [--baselines sglang-cache-aware] [--workers 2]

One simulation is deterministic, but a small change in placement changes which engine holds what
for the rest of the replay, so one window says little about a few percent. Each variant runs on
``--windows`` disjoint windows of ``--window-s`` trace seconds (0, 1200, 2400 … s, each shifted
to start at 0) and the table reports the mean over windows of TTFT P50/P90/P99, SLO attainment
and prefix hit rate. A variant is the h100x8 fleet file with plugin parameters (and profile
weights) overridden in the fleet file, as a user would.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
# /work/shared/traces from the main checkout (/work/main) or a worktree (/work/wt/NAME)
TRACE = next((p / "shared" / "traces" / "mooncake_conversation.jsonl"
              for p in (ROOT.parent, ROOT.parent.parent)
              if (p / "shared" / "traces" / "mooncake_conversation.jsonl").exists()),
             ROOT.parent / "shared" / "traces" / "mooncake_conversation.jsonl")
FLEET = ROOT / "examples" / "fleets" / "h100x8.yaml"

_SCORE = {"slo-first": {"when_none_meets": "score"}}
VARIANTS: dict[str, dict[str, Any]] = {
    "fastest": {"slo-first": {"when_none_meets": "fastest"}},
    "score": _SCORE,
    "score+room-size": {**_SCORE, "prefix-affinity": {"room_weight": 1.0, "room_by": "size"}},
    "score+room-size-0.5": {**_SCORE, "prefix-affinity": {"room_weight": 0.5, "room_by": "size"}},
    "score+room-writes-0.5": {**_SCORE, "prefix-affinity": {"room_weight": 0.5,
                                                            "room_by": "writes"}},
    "score+prefix-3": {**_SCORE, "weights": {"prefix-affinity": 3}},
    "score+prefix-4": {**_SCORE, "weights": {"prefix-affinity": 4}},
}
# The shipped default profile, in order, with its weights (a variant may change weights).
DEFAULT = [("model-served", None), ("context-window", None), ("health", None),
           ("jurisdiction", None), ("precision", None), ("capacity-class", None),
           ("saturation", None), ("predicted-latency", 3), ("prefix-affinity", 2),
           ("session-affinity", 1), ("load", 2), ("cost", 1), ("locality", 1), ("energy", 1),
           ("slo-first", None)]


def fleet_file(variant: str, out: Path) -> Path:
    raw = yaml.safe_load(FLEET.read_text("utf-8"))
    v = dict(VARIANTS.get(variant, {}))
    weights = v.pop("weights", None)
    raw["plugins"] = [{"type": t, "parameters": p} for t, p in v.items()]
    if weights:
        plugs = []
        for ref, w in DEFAULT:
            w = weights.get(ref, w)
            plugs.append({"ref": ref} if w is None else {"ref": ref, "weight": w})
        raw["profiles"] = [{"name": "default", "plugins": plugs}]
    path = out / f"fleet-{variant}.yaml"
    path.write_text(yaml.safe_dump(raw), "utf-8")
    return path


def windows(n: int, seconds: float, out: Path) -> list[Path]:
    rows = [json.loads(line) for line in TRACE.read_text("utf-8").splitlines() if line.strip()]
    paths = []
    for k in range(n):
        start = k * 1200_000  # ms
        sel = [r for r in rows if start <= r["timestamp"] < start + seconds * 1000]
        p = out / f"window{k}.jsonl"
        p.write_text("".join(json.dumps({**r, "timestamp": r["timestamp"] - start}) + "\n"
                             for r in sel), "utf-8")
        paths.append(p)
    return paths


def run(job: tuple[str, str, str, str, float]) -> tuple[str, str, float, dict[str, Any]]:
    from inferplane.twin.simulator.simulator import run_simulation

    label, fleet, trace, profile, rate = job
    r = run_simulation(fleet, trace, profile, format="mooncake", rate_scale=rate, seed=1,
                       mix=None, duration_s=None, limit=None)
    return label, profile, rate, r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--window-s", type=float, default=400.0)
    ap.add_argument("--rates", default="1,6,7")
    ap.add_argument("--variants", default="fastest,score,score+room-size,score+room-writes-0.5")
    ap.add_argument("--baselines", default="sglang-cache-aware")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    rates = [float(x) for x in a.rates.split(",")]
    variants = [v for v in a.variants.split(",") if v]
    baselines = [b for b in a.baselines.split(",") if b]
    tmp = Path(tempfile.mkdtemp(prefix="cache-placement-"))
    wins = windows(a.windows, a.window_s, tmp)
    jobs = []
    for w in wins:
        for rate in rates:
            jobs += [(v, str(fleet_file(v, tmp)), str(w), "default", rate) for v in variants]
            jobs += [(b, str(FLEET), str(w), b, rate) for b in baselines]
    acc: dict[tuple[str, float], list[dict[str, Any]]] = {}
    with ProcessPoolExecutor(a.workers) as ex:
        for label, _, rate, r in ex.map(run, jobs):
            acc.setdefault((label, rate), []).append(r)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    print(f"Command: `python bench/cache_placement.py --windows {a.windows} --window-s "
          f"{a.window_s:g} --rates {a.rates} --variants {a.variants} --baselines "
          f"{a.baselines}` — {date.today()}, git {git}, {platform.node()} ({os.cpu_count()} "
          f"cores), Python {platform.python_version()}. Means over {a.windows} windows.\n")
    print("| rate | variant | TTFT p50 s | TTFT p90 s | TTFT p99 s | SLO attainment | prefix hit |")
    print("|---|---|---|---|---|---|---|")
    for rate in rates:
        for label in [*variants, *baselines]:
            rs = acc[(label, rate)]

            def mean(f: Any, rs: list[dict[str, Any]] = rs) -> float:
                return sum(f(r) for r in rs) / len(rs)

            print(f"| ×{rate:g} | {label} | {mean(lambda r: r['ttft_s']['p50']):.3f} | "
                  f"{mean(lambda r: r['ttft_s']['p90']):.3f} | "
                  f"{mean(lambda r: r['ttft_s']['p99']):.3f} | "
                  f"{mean(lambda r: r['slo_attainment']):.3f} | "
                  f"{mean(lambda r: r['prefix_hit_rate']):.4f} |")


if __name__ == "__main__":
    main()
