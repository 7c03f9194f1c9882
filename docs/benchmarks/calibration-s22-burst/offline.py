"""Offline over every stored fidelity report (sessions 15-21): the fitted profile, the held-out
measurements, the placement predictor's stored predictions and physics.calibration.predict_burst_s."""
import glob, json, sys, statistics, yaml
sys.path[:0] = ["src", "."]
from inferplane.physics.calibration import predict_burst_s, predict_ttft_s
from inferplane.physics.hardware import HardwareProfile
from inferplane.physics.models import get_model
from inferplane.physics.roofline import Roofline

def reports():
    for f in sorted(glob.glob("docs/benchmarks/calibration-s1[5679]/*report.json")) + sorted(
            glob.glob("docs/benchmarks/calibration-s2[01]/*report.json")):  # not session 22's own
        d = json.load(open(f))
        if "calibration_profile" not in d:
            continue
        yield f, d

def roofline(d):
    doc = yaml.safe_load(d["calibration_profile"])
    h = dict(doc["hardware"]); h.pop("base", None)
    hw = HardwareProfile(**h)
    c = doc["calibration"]
    return Roofline(hw, get_model(c["model_profile"]), c["tp"], c["precision"]), doc

if __name__ == "__main__":
    for f, d in reports():
        r, doc = roofline(d)
        hw = r.hardware
        ho = d["calibration_held_out_ms"]
        meas = [*ho["alone"].values(), *ho["burst"]]
        pb = [x * 1e3 for x in predict_burst_s(r, 3, 320)]
        pl = d["calibration_prediction_error"]["predicted_ms"]
        b4 = doc["calibration"]["bursts"][0]
        print(f.split("/")[-2][12:], f.split("/")[-1][:-12],
              "meas", " ".join(f"{x:5.2f}" for x in meas),
              "| placement", " ".join(f"{x:5.2f}" for x in pl[3:]),
              "| burst_s", " ".join(f"{x:5.2f}" for x in pb),
              "| b4 meas", " ".join(f"{x*1e3:5.2f}" for x in b4["ttft_s"]),
              "fit", " ".join(f"{x*1e3:5.2f}" for x in b4["fitted_s"]),
              "| s h t R %.2f %.2f %.3f %.2f" % (hw.frontend_request_s*1e3, hw.frontend_handoff_s*1e3,
                                              hw.frontend_token_s*1e3, hw.request_overhead_s*1e3))
