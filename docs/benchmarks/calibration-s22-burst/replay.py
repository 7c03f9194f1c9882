"""Offline: every stored fidelity report's fitted profile (sessions 15-21, and this session's)
through the placement predictor of *this* checkout (bench.calibration.predicted_ttft_s, as the
fidelity test computes it), against the report's held-out measurements; and the physics model
told the whole burst (physics.calibration.predict_burst_s). Prints per run and the summary.
    PYTHONPATH=src:. python docs/benchmarks/calibration-s22-burst/replay.py [GLOB ...]
"""
import glob, json, statistics as st, sys, tempfile
from pathlib import Path

sys.path[:0] = ["src", "."]
from bench.calibration import HELD_OUT_BURST, PROFILE_NAME, emulator_fleet, predicted_ttft_s  # noqa: E402
from inferplane.physics.calibration import load_profile_file, predict_burst_s  # noqa: E402
from inferplane.physics.models import get_model  # noqa: E402
from inferplane.physics.roofline import Roofline  # noqa: E402

# the files replay-main.txt was run on (45 runs; not session 22's own, which came after)
DEFAULT = ["docs/benchmarks/calibration-s1[5679]/*report.json",
           "docs/benchmarks/calibration-s2[01]/*report.json"]


def run(files):
    rows = []
    size, tokens = HELD_OUT_BURST
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            d = json.load(open(f))
            if "calibration_profile" not in d:
                continue
            prof = Path(tmp) / "profile.yaml"
            prof.write_text(d["calibration_profile"])
            hw, _ = load_profile_file(prof)
            fleet = emulator_fleet(PROFILE_NAME, 9, prof)
            ho = d["calibration_held_out_ms"]
            lengths = [int(x) for x in ho["alone"]]
            meas = [*ho["alone"].values(), *ho["burst"]]
            pred = [predicted_ttft_s(fleet, n) * 1e3 for n in lengths]
            pred += [predicted_ttft_s(fleet, tokens, k) * 1e3 for k in range(size)]
            r = Roofline(hw, get_model("tiny-llama"), 1, "fp32")
            phys = [x * 1e3 for x in predict_burst_s(r, size, tokens)]
            e = [(p - m) / m for p, m in zip(pred, meas)]
            eb = [(p - m) / m for p, m in zip(phys, meas[3:])]
            stored = d["calibration_prediction_error"]["median"]
            rows.append((f, st.median(abs(x) for x in e), stored, e, eb))
            print(f"{'/'.join(f.split('/')[-2:])[12:-12]:<28} median {rows[-1][1]:.3f} (stored "
                  f"{stored:.3f}) [" + " ".join(f"{x:+.2f}" for x in e) + "] physics burst ["
                  + " ".join(f"{x:+.2f}" for x in eb) + "]")
    ms = [r[1] for r in rows]
    print(f"runs {len(rows)}: median of medians {st.median(ms):.3f} (stored "
          f"{st.median(r[2] for r in rows):.3f}); misses {sum(m > 0.2 for m in ms)} (stored "
          f"{sum(r[2] > 0.2 for r in rows)}); per case median signed error "
          + " ".join(f"{st.median(r[3][i] for r in rows):+.3f}" for i in range(6))
          + "; physics burst " + " ".join(f"{st.median(r[4][i] for r in rows):+.3f}" for i in range(3)))
    # the six cases with the physics model's burst in place of the predictor's ranks
    pm = [st.median([abs(x) for x in r[3][:3]] + [abs(x) for x in r[4]]) for r in rows]
    print(f"with the physics burst: median of medians {st.median(pm):.3f}; "
          f"misses {sum(m > 0.2 for m in pm)}")
    return rows


if __name__ == "__main__":
    pats = sys.argv[1:] or DEFAULT
    run(sorted(f for p in pats for f in glob.glob(p)))
