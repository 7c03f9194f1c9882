import json, sys, tempfile, statistics as st
from pathlib import Path
sys.path[:0] = ["src", "."]
from bench.calibration import PROFILE_NAME, emulator_fleet, predicted_ttft_s
from inferplane.physics.calibration import load_profile_file, predict_burst_s
from inferplane.physics.models import get_model
from inferplane.physics.roofline import Roofline
d = json.load(open(sys.argv[1]))
with tempfile.TemporaryDirectory() as tmp:
    p = Path(tmp) / "p.yaml"; p.write_text(d["profile"]); hw, _ = load_profile_file(p)
    fleet = emulator_fleet(PROFILE_NAME, 9, p)
    r = Roofline(hw, get_model("tiny-llama"), 1, "fp32")
    for size in (2, 3, 4):
        for n in (64, 320, 640):
            k = f"burst_{size}x{n}"
            if k not in d: continue
            last = st.median(max(x) for x in d[k]) * 1e3
            a = predicted_ttft_s(fleet, n, size - 1) * 1e3
            c = predict_burst_s(r, size, n)[-1] * 1e3
            print(f"{k}: last measured {last:6.2f}  placement(ahead={size-1}) {a:6.2f} ({(a-last)/last:+.2f})  predict_burst_s last {c:6.2f} ({(c-last)/last:+.2f})")
