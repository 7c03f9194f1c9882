"""Offline: rank 0's delay over a lone request of its size, the probe's burst of 4 x 64 against
the held-out burst of 3 x 320, and the fit's burst model of both (which the emulator follows)."""
import json, sys, tempfile, yaml
from pathlib import Path
from inferplane.physics.calibration import load_hardware_profile, predict_ttft_s, predict_burst_s
from inferplane.physics.models import get_model
from inferplane.physics.roofline import Roofline
rows = []
for f in sys.argv[1:]:
    r = json.load(open(f)); doc = yaml.safe_load(r['calibration_profile'])
    p = Path(tempfile.mktemp(suffix='.yaml')); p.write_text(r['calibration_profile'])
    rf = Roofline(load_hardware_profile(p), get_model('tiny-llama'), 1, 'fp32')
    b = doc['calibration']['bursts'][0]
    lone64 = next(x['ttft_s'] for x in doc['calibration']['prefill'] if x['prompt_tokens'] == b['prompt_tokens'] and x['cached_tokens'] == 0) if any(x['prompt_tokens'] == b['prompt_tokens'] for x in doc['calibration']['prefill']) else None
    lone64 = min(doc['calibration']['prefill'], key=lambda x: abs(x['prompt_tokens'] - b['prompt_tokens']) + 1e6 * x['cached_tokens'])['ttft_s']
    d4 = (b['ttft_s'][0] - lone64) * 1e3; m4 = (b['fitted_s'][0] - predict_ttft_s(rf, b['prompt_tokens'])) * 1e3
    ho = r['calibration_held_out_ms']; d3 = ho['burst'][0] - ho['alone']['320']
    m3 = (predict_burst_s(rf, 3, 320)[0] - predict_ttft_s(rf, 320)) * 1e3
    print(f"{Path(f).name[:10]:10s} 4x{b['prompt_tokens']} rank0 over lone: real {d4:+5.2f} fit {m4:+5.2f} | 3x320: real {d3:+5.2f} fit {m3:+5.2f}")
