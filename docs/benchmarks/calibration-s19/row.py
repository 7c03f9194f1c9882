"""Session 19: one table row per fidelity run (its report.json): other CPU, prediction error,
the emulator's gaps, the control (real odd vs even rounds; median over rounds, then pooled),
and the fitted speed spread (P10 / P90, window).

    python docs/benchmarks/calibration-s19/row.py NAME-report.json ...
"""
import json, statistics as st, sys
import yaml

for f in sys.argv[1:]:
    r = json.load(open(f))
    g, c, cp = (r["calibration_workload_gaps"], r["calibration_control"],
                r["calibration_control_pooled"])
    pg = r["calibration_pooled_gaps"]
    hw = yaml.safe_load(r["calibration_profile"])["hardware"]
    sp = hw.get("speed_spread")
    spread = (f"{st.quantiles(sp, n=10, method='inclusive')[0]:.3f} / "
              f"{st.quantiles(sp, n=10, method='inclusive')[-1]:.3f} over "
              f"{hw['speed_spread_window_s'] * 1e3:.0f} ms") if sp else "—"
    print(f"| {f.split('/')[-1][:-12]} | {r['calibration_other_cpu']} | "
          f"{r['calibration_prediction_error']['median']:.1%} | "
          f"{g['ttft_p50']:+.1%} / {g['ttft_p90']:+.1%} | {g['tpot_p50']:+.1%} / "
          f"{g['tpot_p90']:+.1%} | {pg['tpot_p90']:+.1%} | {c['ttft_p90']:+.1%} / "
          f"{c['tpot_p50']:+.1%} / {c['tpot_p90']:+.1%} | {cp['tpot_p90']:+.1%} | {spread} |")
