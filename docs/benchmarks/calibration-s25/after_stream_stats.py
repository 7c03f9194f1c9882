"""Offline, from ``after_stream.json`` (``after_stream.py``'s tries, ms): each preceder's effect
on the cold prefill pooled over the three lengths. For every round and length the relative
difference of the timed request after the preceder against the one after ``BASE`` in the same
round (paired), the median of those ROUNDS x 3 pairs, and a bootstrap 95 % CI of that median
(pairs resampled, B times, fixed seed). BASE ``one``: against right after a one-token request;
BASE ``cached``: against the probe's default order (the opt-in's own gain). Also the median
paired difference in ms at 768 tokens.

    python docs/benchmarks/calibration-s25/after_stream_stats.py [after_stream.json]
"""
from __future__ import annotations

import json
import random
import statistics
import sys
from pathlib import Path

B = 10_000
HERE = Path(__file__).parent


def pooled(data: dict[str, dict[str, list[float]]], k: str, base: str) -> list[float]:
    return [a / b - 1 for n in data[k] for a, b in zip(data[k][n], data[base][n], strict=True)]


def ci(xs: list[float], rng: random.Random) -> tuple[float, float]:
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(B))
    return meds[int(0.025 * B)], meds[int(0.975 * B) - 1]


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "after_stream.json"
    data = json.loads(path.read_text())
    rng = random.Random(25)
    print(f"{path.name}: median paired relative difference pooled over the lengths, "
          f"bootstrap 95 % CI ({B} resamples); 768 tok median paired difference")
    print("| preceder | against | pairs | median | 95 % CI | 768 tok ms |")
    print("|---|---|---|---|---|---|")
    for base in ("one", "cached"):
        for k in data:
            if k == base or (base == "cached" and k == "one"):
                continue
            xs = pooled(data, k, base)
            lo, hi = ci(xs, rng)
            d768 = statistics.median(a - b for a, b in
                                     zip(data[k]["768"], data[base]["768"], strict=True))
            print(f"| {k} | {base} | {len(xs)} | {statistics.median(xs) * 100:+.1f} % | "
                  f"{lo * 100:+.1f} … {hi * 100:+.1f} % | {d768:+.2f} |")


if __name__ == "__main__":
    main()
