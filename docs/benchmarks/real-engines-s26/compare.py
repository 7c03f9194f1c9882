"""Session 26: compare the setups of one real_engines.py run request by request.

    python docs/benchmarks/real-engines-s26/compare.py RUN/results.json [REFERENCE]

Prints, per setup, the pooled TTFT percentiles (p10 ... p90) and mean over its repetitions,
the engines' own mean TTFT per repetition and the client's mean less it (the time outside the
engines: client, router, the engines' HTTP intake and the way back); each repetition's P50/P90;
and for each setup against REFERENCE (default: vllm-router cache_aware) the paired difference
(the same request in the same repetition: median, mean), the difference of each burst's
fastest answer by burst size (3 / 4-7 / 8-11 / 12+ requests), and by the rank of a request's
prompt length in its burst (0: the shortest).
"""
from __future__ import annotations

import collections
import json
import statistics as st
import sys


def q(v: list[float], p: float) -> float:
    v = sorted(v)
    return v[round(p * (len(v) - 1))]


def main() -> None:
    with open(sys.argv[1]) as f:
        d = json.load(f)
    ref = sys.argv[2] if len(sys.argv) > 2 else "vllm-router cache_aware"
    res = d["results"]
    names: list[str] = []
    for r in res:
        if r["name"] not in names:
            names.append(r["name"])
    print("pooled TTFT ms: p10 p25 p40 p50 p60 p75 p90 | mean | engines' own mean per rep | "
          "client mean less engines' own, per rep")
    for n in names:
        reps = [r for r in res if r["name"] == n]
        v = [row[4] for r in reps for row in r["per_request"] if row[6]]
        eng = [r["engine_ms"]["ttft"] for r in reps]
        cm = [st.mean([row[4] for row in r["per_request"] if row[6]]) for r in reps]
        cells = " ".join(f"{q(v, p):5.0f}" for p in (.1, .25, .4, .5, .6, .75, .9))
        outside = [round(a - b, 1) for a, b in zip(cm, eng, strict=True)]
        print(f"{n[:34]:34}", cells, f"| {st.mean(v):.1f} |", eng, "|", outside)
    print("per rep (rep, P50, P90):")
    for n in names:
        print(f"{n[:34]:34}", [(r["rep"], round(r["summary"]["ttft_ms"]["p50"]),
                                round(r["summary"]["ttft_ms"]["p90"])) for r in res
                               if r["name"] == n])
    by = {(r["name"], r["rep"]): {row[0]: row for row in r["per_request"]} for r in res}
    reps_ = sorted({r["rep"] for r in res})
    for n in names:
        if n == ref:
            continue
        diffs: list[float] = []
        fb: dict[int, list[float]] = collections.defaultdict(list)
        rank: dict[int, list[float]] = collections.defaultdict(list)
        for rep in reps_:
            a, b = by.get((n, rep)), by.get((ref, rep))
            if not a or not b:
                continue
            bursts: dict[float, list[int]] = collections.defaultdict(list)
            for i, row in a.items():
                bursts[row[1]].append(i)
            for ids in bursts.values():
                ok = [i for i in ids if a[i][6] and b[i][6]]
                if ok:
                    fb[min(len(ids), 12) // 4].append(min(a[i][4] for i in ok)
                                                      - min(b[i][4] for i in ok))
                for k, i in enumerate(sorted(ok, key=lambda i: a[i][2])):
                    rank[min(k, 5)].append(a[i][4] - b[i][4])
                diffs += [a[i][4] - b[i][4] for i in ok]
        print(f"{n} less {ref}: paired median {st.median(diffs):.1f} mean {st.mean(diffs):.1f}"
              f" ms (n {len(diffs)})")
        print("  fastest of a burst, by size (3 / 4-7 / 8-11 / 12+):",
              {k: round(st.median(v), 1) for k, v in sorted(fb.items())})
        print("  by rank of prompt length in the burst (0 shortest, 5: 6th and longer):",
              {k: round(st.median(v), 1) for k, v in sorted(rank.items())})


if __name__ == "__main__":
    main()
