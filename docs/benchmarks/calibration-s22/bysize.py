"""Per prompt size at c1 (the workload pops 768, 384, 128, 32, ... in that order; at c1 the
samples come in that order), and per pair at c2 (768+384 sent together, then 128+32), the
median over rounds: real against the emulator, from a fidelity run's calibration-samples.json
and its report's profile."""
import json, sys, statistics as st, tempfile
from pathlib import Path
from inferplane.physics.calibration import load_hardware_profile, predict_ttft_s
from inferplane.physics.models import get_model
from inferplane.physics.roofline import Roofline
samples = json.load(open(sys.argv[1])); rep = json.load(open(sys.argv[2]))
p = Path(tempfile.mktemp(suffix='.yaml')); p.write_text(rep['calibration_profile'])
rf = Roofline(load_hardware_profile(p), get_model('tiny-llama'), 1, 'fp32')
order = [768, 384, 128, 32] * 3
for name, runs in samples.items():
    c1 = {n: [] for n in (768, 384, 128, 32)}
    c2 = {k: [] for k in ('768 (1st of pair)', '384 (2nd)', '128/32 pair', )}
    for r in runs:
        v1 = [x for x, l in zip(r['ttft'], r['ttft_level']) if l == 1]
        for n, x in zip(order, v1): c1[n].append(x)
        v2 = [x for x, l in zip(r['ttft'], r['ttft_level']) if l == 2]
        for i in range(0, 12, 4):
            c2['768 (1st of pair)'].append(v2[i]); c2['384 (2nd)'].append(v2[i + 1])
            c2['128/32 pair'] += v2[i + 2:i + 4]
    print(name, 'c1', {n: round(st.median(v), 2) for n, v in c1.items()},
          'c2', {k: round(st.median(v), 2) for k, v in c2.items()})
print('model lone', {n: round(predict_ttft_s(rf, n) * 1e3, 2) for n in (768, 384, 128, 32)})
