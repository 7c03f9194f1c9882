"""Per stored fidelity report: the emulator's TTFT gaps, the probe's lone 16- and 768-token prefill
(measured) and the fit's attention factor, the real engine's TTFT P50, and the held-out lone
640-token samples (one per held-out repeat, in time order): the host's speed state."""
import json, re, sys
for f in sys.argv[1:]:
    r = json.load(open(f))
    fit = r["calibration_fit"]
    att = re.search(r"attention x([\d.]+)", fit).group(1)
    pts = {int(m.group(1)): float(m.group(2)) for l in r["calibration_fit_points"]
           if (m := re.match(r"prefill (\d+) tok\s+([\d.]+)", l))}
    g = r["calibration_workload_gaps"]
    h = r.get("calibration_held_out_samples_ms", {}).get("alone", {}).get("640", [])
    name = "/".join(f.split("/")[-2:]).replace("-report.json", "")
    print(f"{name:<28} P50 gap {g['ttft_p50']:+.3f}  real P50 {r['calibration_workload_ms']['real']['ttft_p50']:5.1f}"
          f"  probe 16 {pts[16]:5.1f} 768 {pts[768]:5.1f}  attention x{att:<5}"
          f"  held-out 640 alone {[round(x) for x in h]}")
