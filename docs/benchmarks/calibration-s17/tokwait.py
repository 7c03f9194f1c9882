"""Offline (session 17): the closed-loop 768-token request's delay over lone against when its
three successors (384, 128, 32) are sent, with the fitted FCFS front end of arr-104617, with and
without a wait that grows with the prompt (k s per token beyond 32, taken out of the fixed
wait so that a 32-token request is unchanged)."""
import json, sys, heapq, statistics as st
sys.path[:0] = ['src']  # run from the repository root
from inferplane.physics.frontend import FrontEnd
from inferplane.physics.roofline import Roofline
from inferplane.physics.models import get_model
from inferplane.physics.calibration import load_hardware_profile

d = json.load(open('docs/benchmarks/calibration-s17/arr-104617-report.json'))
import tempfile, os
with tempfile.NamedTemporaryFile('w', suffix='.yaml', delete=False) as f:
    f.write(d['calibration_profile'])
hw = load_hardware_profile(f.name); os.unlink(f.name); r = Roofline(hw, get_model('tiny-llama'), 1, 'fp32')

def first_token(reqs, k):
    fe = FrontEnd(hw.frontend_request_s, hw.frontend_token_s, hw.frontend_handoff_s)
    ev = [(t, 0, i) for i, (t, n) in enumerate(reqs)]; heapq.heapify(ev); arrive = {}
    while ev:
        tm, kind, i = heapq.heappop(ev)
        if kind == 0:
            heapq.heappush(ev, (fe.intake(tm) + hw.request_overhead_s + k * max(0, reqs[i][1] - 32), 1, i))
        else:
            arrive[i] = fe.handoff(tm)
    # engine: steps take everything arrived by their start (prefill only; enough for the 768's first token)
    order = sorted(arrive, key=arrive.get); free = 0.0; done = {}
    while order:
        start = max(free, arrive[order[0]])
        batch = [i for i in order if arrive[i] <= start]; order = [i for i in order if i not in batch]
        toks = sum(reqs[i][1] for i in batch); pairs = sum(reqs[i][1] ** 2 / 2 for i in batch)
        free = start + r.step_time_s(toks, 0, 0, 0, prefill_pairs=pairs)
        for i in batch: done[i] = fe.emit(free, len(batch))
    return done[0]

for k in (0.0, 3.7e-6):
    lone = first_token([(0.0, 768)], k)
    row = []
    for D in (1, 2, 3, 4, 5, 6, 7):
        D /= 1e3
        row.append((first_token([(0.0, 768), (D, 384), (D, 128), (D, 32)], k) - lone) * 1e3)
    iso = (first_token([(0.0, 768), (5e-3, 384), (5e-3, 128), (5e-3, 32)], k) - lone) * 1e3
    print(f"k={k*1e6:.1f} us/token: 768 lone {lone*1e3:.1f} ms; delay with successors at D=1..7 ms: " + " ".join(f"{x:+.1f}" for x in row))
