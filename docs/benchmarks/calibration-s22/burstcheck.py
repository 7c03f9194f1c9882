"""Offline: the fit's own burst model (predict_burst_s, which the emulator's front end follows)
for the held-out burst of 3 x 320 against the measured ranks, per stored fidelity report."""
import json, glob, sys, tempfile
from pathlib import Path
from inferplane.physics.calibration import load_hardware_profile, predict_ttft_s, predict_burst_s
from inferplane.physics.models import get_model
from inferplane.physics.roofline import Roofline
for f in sys.argv[1:]:
    r = json.load(open(f))
    p = Path(tempfile.mktemp(suffix='.yaml')); p.write_text(r['calibration_profile'])
    hw = load_hardware_profile(p)
    rf = Roofline(hw, get_model('tiny-llama'), 1, 'fp32')
    pb = [x * 1e3 for x in predict_burst_s(rf, 3, 320)]
    m = r['calibration_held_out_ms']['burst']
    lone = r['calibration_held_out_ms']['alone']['320']
    print(f"{Path(f).name[:14]:14s} lone320 real {lone:5.1f} model {predict_ttft_s(rf,320)*1e3:5.1f} | burst3x320 real " + " ".join(f"{x:5.1f}" for x in m) + "  model " + " ".join(f"{x:5.1f}" for x in pb) + f"  | s {hw.frontend_request_s*1e3:.2f} o {hw.request_overhead_s*1e3:.2f} h {hw.frontend_handoff_s*1e3:.2f}")
