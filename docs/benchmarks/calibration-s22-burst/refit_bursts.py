"""Offline on experiment.json: the run's own fit (its probe: bursts of 4 x 64) against the same
probe with the front end refitted on bursts of 2 x 64 and 4 x 64 (medians by rank, measured by the
experiment in the same minutes), each profile's predict_burst_s against every burst measured."""
import dataclasses, json, statistics as st, sys, tempfile
from pathlib import Path
sys.path[:0] = ["src", "."]
import yaml
from inferplane.physics.calibration import (BurstPoint, Calibration, LoadedPoint, fit_frontend,
                                            load_profile_file, predict_burst_s)
from inferplane.physics.models import get_model
from inferplane.physics.roofline import Roofline

d = json.load(open(sys.argv[1]))
with tempfile.TemporaryDirectory() as tmp:
    p = Path(tmp) / "p.yaml"; p.write_text(d["profile"]); hw, _ = load_profile_file(p)
doc = yaml.safe_load(d["profile"]); c = doc["calibration"]
m = get_model("tiny-llama")
loaded = [LoadedPoint(x["batch"], x["context_tokens"], x["prompt_tokens"], x["ttft_s"]) for x in c["loaded"]]
probe = [BurstPoint(b["size"], b["prompt_tokens"], tuple(b["ttft_s"])) for b in c["bursts"]]
def ranks(k):
    size = int(k[6:].split("x")[0])
    return tuple(st.median(sorted(x)[i] for x in d[k]) for i in range(size))
extra = {"2x64": [BurstPoint(2, 64, ranks("burst_2x64")), *probe],
         "2x64+3x64": [BurstPoint(2, 64, ranks("burst_2x64")), BurstPoint(3, 64, ranks("burst_3x64")), *probe]}
cal = Calibration(hw, (), ())
profiles = {"probe (4x64)": hw}
for name, bursts in extra.items():
    profiles["+" + name] = fit_frontend(cal, m, bursts, loaded, precision="fp32").hardware
for name, h in profiles.items():
    print(f"{name:<16} wait {h.request_overhead_s*1e3:.2f} s {h.frontend_request_s*1e3:.2f} h {h.frontend_handoff_s*1e3:.2f} t {h.frontend_token_s*1e3:.3f} ms")
for k in [k for k in d if k.startswith("burst_")]:
    size, n = map(int, k[6:].split("x"))
    meas = ranks(k)
    line = f"{k:<12} measured " + " ".join(f"{x*1e3:6.2f}" for x in meas)
    for name, h in profiles.items():
        pr = predict_burst_s(Roofline(h, m, 1, "fp32"), size, n)
        line += f" | {name} " + " ".join(f"{(a-b)/b:+.2f}" for a, b in zip(pr, meas))
    print(line)
