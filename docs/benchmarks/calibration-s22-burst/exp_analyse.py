"""Analyse experiment.json: medians per case, burst ranks (sorted and in the order sent) against
the lone TTFTs and against physics.calibration.predict_burst_s on the run's own fitted profile."""
import json, statistics as st, sys, tempfile
from pathlib import Path
sys.path[:0] = ["src", "."]
from inferplane.physics.calibration import load_profile_file, predict_burst_s, predict_ttft_s
from inferplane.physics.models import get_model
from inferplane.physics.roofline import Roofline

d = json.load(open(sys.argv[1]))
with tempfile.TemporaryDirectory() as tmp:
    p = Path(tmp) / "p.yaml"; p.write_text(d["profile"]); hw, _ = load_profile_file(p)
r = Roofline(hw, get_model("tiny-llama"), 1, "fp32")
ms = lambda v: st.median(v) * 1e3
print("lone 96 by predecessor (median ms, n):", {k: (round(ms(d[k]), 2), len(d[k])) for k in
      ("after_openers", "after_warm", "after_idle", "after_burst")})
lone = {n: ms(d[f"lone_{n}"]) for n in (64, 320, 640)}
print("lone:", {n: round(v, 2) for n, v in lone.items()}, "predicted:",
      {n: round(predict_ttft_s(r, n) * 1e3, 2) for n in (64, 320, 640)})
print("per round lone 320:", [round(x * 1e3, 1) for x in d["lone_320"]])
for k in [k for k in d if k.startswith("burst_")]:
    size, n = map(int, k[6:].split("x"))
    runs = d[k]
    srt = [ms([sorted(x)[i] for x in runs]) for i in range(size)]
    sent = [ms([x[i] for x in runs]) for i in range(size)]
    phys = [x * 1e3 for x in predict_burst_s(r, size, n)]
    print(f"{k:<12} sorted " + " ".join(f"{x:6.2f}" for x in srt)
          + " | sent order " + " ".join(f"{x:6.2f}" for x in sent)
          + f" | rank0 - lone {srt[0] - lone.get(n, float('nan')):5.2f}"
          + " | predict_burst_s " + " ".join(f"{x:6.2f}" for x in phys))

print("\nfirst step shared (ranks 0 and 1 within 1.5 ms), and rank 0 over the lone TTFT when not:")
for k in [k for k in d if k.startswith("burst_")]:
    size, n = map(int, k[6:].split("x"))
    runs = [sorted(x) for x in d[k]]
    shared = [x for x in runs if x[1] - x[0] < 1.5e-3]
    alone = [x[0] * 1e3 - lone.get(n, float("nan")) for x in runs if x[1] - x[0] >= 1.5e-3]
    print(f"{k:<12} shared {len(shared)} of {len(runs)}; rank 0 - lone when not: "
          f"{st.median(alone):5.2f} ms (n {len(alone)})" if alone else f"{k}: all shared")
