"""levels_summary.py LEVELS.json: per engine and level, TPOT (median over rounds of the round's
median), the chunk gaps by position in the stream (c1), the gaps that hold another request's
first token (a step that prefilled it beside the decodes) against the rest, and the /metrics
histogram deltas per level (count, mean)."""

from __future__ import annotations

import json
import re
import statistics as st
import sys
from typing import Any


def hist(text: str) -> dict[str, tuple[float, float]]:
    """name -> (sum, count) of every histogram on a /metrics page (labels summed)."""
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        m = re.match(r"^(vllm:[a-z_]+?)_(sum|count)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m:
            v = out.setdefault(m.group(1), [0.0, 0.0])
            v[0 if m.group(2) == "sum" else 1] += float(m.group(4))
    return {k: (v[0], v[1]) for k, v in out.items()}


def main(path: str) -> None:
    with open(path) as f:
        res: dict[str, Any] = json.load(f)
    for name in ("real", "emulator"):
        rounds = res[name]
        print(f"== {name}: {len(rounds)} rounds")
        for li, c in enumerate((1, 2, 4)):
            tp_med, pure, mixed, firsts, pos = [], [], [], [], {}
            mdelta: dict[str, list[tuple[float, float]]] = {}
            walls = []
            for rnd in rounds:
                lv = rnd[li]
                walls.append(lv["wall_s"])
                reqs = lv["requests"]
                tp = [(r["t"][-1] - r["t"][0]) / (len(r["t"]) - 1) for r in reqs if len(r["t"]) > 1]
                tp_med.append(st.median(tp))
                first_times = sorted(r["t"][0] for r in reqs)
                for r in reqs:
                    t = r["t"]
                    firsts.append(t[0] - r["sent"])
                    for i in range(1, len(t)):
                        g = t[i] - t[i - 1]
                        pos.setdefault(i, []).append(g)
                        other = any(t[i - 1] < f <= t[i] + 2e-4 for f in first_times if f != t[0])
                        (mixed if other else pure).append(g)
                b, a = hist(lv["metrics_before"]), hist(lv["metrics_after"])
                for k in a:
                    if k in b:
                        mdelta.setdefault(k, []).append((a[k][0] - b[k][0], a[k][1] - b[k][1]))
            print(f" c{c}: TPOT {st.median(tp_med) * 1e3:.3f} ms (rounds "
                  f"{', '.join(f'{x * 1e3:.2f}' for x in tp_med)}); wall {st.median(walls):.3f} s")
            print(f"   gaps: pure decode n={len(pure)} median {st.median(pure) * 1e3:.3f} "
                  f"mean {st.fmean(pure) * 1e3:.3f}; holding another's first token "
                  f"n={len(mixed)} median {st.median(mixed) * 1e3 if mixed else 0:.3f} "
                  f"mean {st.fmean(mixed) * 1e3 if mixed else 0:.3f}; "
                  f"sum mixed/stream {sum(mixed) / max(1, len(tp_med) * 12) * 1e3:.2f} ms")
            if c == 1:
                print("   gap by position (median ms): " + " ".join(
                    f"{i}:{st.median(v) * 1e3:.2f}" for i, v in sorted(pos.items())
                    if i <= 4 or i >= 29 or i % 8 == 0))
            for k, v in sorted(mdelta.items()):
                s, n = sum(x[0] for x in v), sum(x[1] for x in v)
                if n:
                    print(f"   {k}: count/round {n / len(v):.1f} mean {s / n * 1e3:.3f} ms")
            if name == "real" and "cpu_api_engine_s" in rounds[0][li]:
                api = st.median(r[li]["cpu_api_engine_s"][0] for r in rounds)
                eng = st.median(r[li]["cpu_api_engine_s"][1] for r in rounds)
                print(f"   CPU s per level: API server {api:.3f}, engine {eng:.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
