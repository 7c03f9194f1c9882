"""Per real workload round: the round's c1 768-token TTFT (median of its 3), its TTFT P50 (of 36),
and when it ran (s from the start); the probe's lone 768-token prefill and the emulator's c1 768."""
import json, re, statistics as st, sys
for a in sys.argv[1:]:
    sp, rp, tag = a.split(",")
    s, r = json.load(open(sp)), json.load(open(rp))
    probe = next(float(m.group(1)) for l in r["calibration_fit_points"]
                 if (m := re.match(r"prefill 768 tok\s+([\d.]+)", l)))
    def c1_768(run):
        v = [x for x, l in zip(run["ttft"], run["ttft_level"]) if l == 1]
        return st.median(v[0::4])
    real = [(round(t), round(c1_768(x), 1), round(st.median(x["ttft"]), 1))
            for t, x in zip(r["calibration_round_at_s"]["real"], s["real"])]
    emu = [round(c1_768(x), 1) for x in s["calibrated"]]
    print(f"{tag}: probe lone 768 {probe:.1f}; emulator c1 768 per round {emu}")
    print("   real (at s, c1 768, round P50):", " ".join(f"{t}:{a}/{b}" for t, a, b in real))
