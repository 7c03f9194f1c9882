"""Session 19: where the real engine's TPOT P90 comes from, per stored fidelity run (the test's
calibration-samples.json). Per run, for the real engine and the emulator: P50 / P90 of time per
output token (median over rounds of each round's), the P90 with every stream replaced by its
concurrency level's median in its round ("flat": what is left without the spread within a
level — the levels' own difference, i.e. batching and prefills mixed into decode steps), and
the share of streams more than 1.1x / 1.25x their level's round median, per level.

    python docs/benchmarks/calibration-s19/tails.py FILE-samples.json ...
"""
import json, statistics as st, sys


def pct(xs, q):
    return st.quantiles(xs, n=100, method="inclusive")[q - 1]


def stats(rounds):
    p50 = st.median(pct(r["tpot"], 50) for r in rounds)
    p90 = st.median(pct(r["tpot"], 90) for r in rounds)
    flat, ratios = [], {1: [], 2: [], 4: []}
    for r in rounds:
        med = {c: st.median([t for t, lv in zip(r["tpot"], r["tpot_level"]) if lv == c])
               for c in (1, 2, 4)}
        flat.append(pct([med[lv] for lv in r["tpot_level"]], 90))
        for t, lv in zip(r["tpot"], r["tpot_level"]):
            ratios[lv].append(t / med[lv])
    share = {c: (sum(x > 1.1 for x in v) / len(v), sum(x > 1.25 for x in v) / len(v))
             for c, v in ratios.items()}
    return p50, p90, st.median(flat), share


print("| run | real P50 / P90 (ms) | real flat P90 | real P90 over flat | emulator P50 / P90 | "
      "emulator P90 over flat | P90 gap | streams > 1.1x / 1.25x their level's round median, "
      "real c1 · c2 · c4 | emulator c1 · c2 · c4 |")
print("|---|---|---|---|---|---|---|---|---|")
for f in sys.argv[1:]:
    s = json.load(open(f))
    real = stats(s["real"])
    emu = stats(next(v for k, v in s.items() if k != "real"))
    fmt = lambda sh: " · ".join(f"{a:.0%}/{b:.0%}" for a, b in sh.values())
    name = f.split("/")[-1].replace("-samples.json", "").replace("calibration", f.split("/")[-2])
    print(f"| {name} | {real[0]:.2f} / {real[1]:.2f} | {real[2]:.2f} | {real[1]/real[2]-1:+.1%} | "
          f"{emu[0]:.2f} / {emu[1]:.2f} | {emu[1]/emu[2]-1:+.1%} | {emu[1]/real[1]-1:+.1%} | "
          f"{fmt(real[3])} | {fmt(emu[3])} |")
