"""Offline: refit the front end of exp3's profile with a burst of 2 x 64 beside the probe's
4 x 64 (its ranks = the probe's lone 64 + exp3's measured pair offsets +2.6 / +9.8 ms)."""
import json, tempfile, yaml, dataclasses
from pathlib import Path
from inferplane.physics.calibration import (load_hardware_profile, predict_ttft_s, predict_burst_s,
    BurstPoint, LoadedPoint, Calibration, fit_frontend)
from inferplane.physics.models import get_model
from inferplane.physics.roofline import Roofline
r = json.load(open('/work/exp/calib22/exp3.json'))
doc = yaml.safe_load(r['profile'])
p = Path(tempfile.mktemp(suffix='.yaml')); p.write_text(r['profile'])
hw = load_hardware_profile(p); m = get_model('tiny-llama')
b4 = doc['calibration']['bursts'][0]; lp = doc['calibration']['loaded'][0]
B4 = BurstPoint(4, b4['prompt_tokens'], tuple(b4['ttft_s']))
L = LoadedPoint(lp['batch'], lp['context_tokens'], lp['prompt_tokens'], lp['ttft_s'])
lone64 = next(x['ttft_s'] for x in doc['calibration']['prefill'] if x['prompt_tokens'] == 64 and not x['cached_tokens'])
B2 = BurstPoint(2, 64, (lone64 + 2.6e-3, lone64 + 9.8e-3))
cal = Calibration(hardware=hw, prefill=(), decode=())
for name, bursts in (("4x64 only", [B4]), ("2x64 + 4x64", [B2, B4])):
    c = fit_frontend(cal, m, bursts, [L], tp=1, precision='fp32')
    h = c.hardware; rf = Roofline(h, m, 1, 'fp32')
    print(name, f"s {h.frontend_request_s*1e3:.2f} o {h.request_overhead_s*1e3:.2f} h {h.frontend_handoff_s*1e3:.2f} t {h.frontend_token_s*1e3:.3f}")
    for b in (B2, B4):
        print('   ', b.size, 'x64 real', [round(x*1e3,1) for x in b.ttft_s], 'model', [round(x*1e3,1) for x in predict_burst_s(rf, b.size, 64)])
    print('    lone64', round(predict_ttft_s(rf,64)*1e3,2), '3x320', [round(x*1e3,1) for x in predict_burst_s(rf,3,320)], 'lone320', round(predict_ttft_s(rf,320)*1e3,1))
