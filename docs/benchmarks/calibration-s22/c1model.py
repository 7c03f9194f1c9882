"""Offline over session 21's stored reports: the c1 TTFT P50 the calibrated profile's own model
gives for the workload's mix (3 each of 32/128/384/768 tokens: the median of 12 is the mean of
the 128- and 384-token lone TTFTs) against what the emulator and the real engine measured."""
import json, glob, sys, tempfile, statistics
from pathlib import Path
from inferplane.physics.calibration import load_hardware_profile, predict_ttft_s
from inferplane.physics.models import get_model
from inferplane.physics.roofline import Roofline
for f in sorted(glob.glob(sys.argv[1] + '/*-report.json')):
    r = json.load(open(f))
    if 'calibration_profile' not in r: continue
    p = Path(tempfile.mktemp(suffix='.yaml')); p.write_text(r['calibration_profile'])
    hw = load_hardware_profile(p)
    rf = Roofline(hw, get_model('tiny-llama'), 1, 'fp32')
    m = {n: predict_ttft_s(rf, n) * 1e3 for n in (32, 128, 384, 768)}
    c1 = (m[128] + m[384]) / 2
    lv = r['calibration_workload_per_level_ms']
    print(f"{Path(f).name[:12]:12s} model c1 {c1:5.2f}  emu {lv['calibrated']['c1'][0]:5.1f} ({lv['calibrated']['c1'][0]-c1:+.2f})  real {lv['real']['c1'][0]:5.1f} ({lv['real']['c1'][0]-c1:+.2f})   c2 emu {lv['calibrated']['c2'][0]:5.1f} real {lv['real']['c2'][0]:5.1f}  R {1e3*(hw.request_overhead_s+hw.frontend_request_s+hw.frontend_handoff_s+hw.frontend_token_s):.2f} t {hw.frontend_token_s*1e3:.3f}")
