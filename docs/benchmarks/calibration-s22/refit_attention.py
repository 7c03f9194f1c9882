"""Offline: each stored profile's own probe points refitted with attention priced apart (as the
fit does) and with it priced with the matmuls (attention=False); per fit its median / max error,
the lone 768-token prefill and one step prefilling the c4 burst (768+384+128+32 tokens, each
chunk attending to its own prompt), and that step over the lone 768's: how much the attention
factor alone bends the long end."""
import json, sys, tempfile
from pathlib import Path
import yaml
from inferplane.physics.calibration import (DecodePoint, PrefillPoint, fit,
                                            load_hardware_profile)
from inferplane.physics.hardware import get_hardware
from inferplane.physics.models import get_model
from inferplane.physics.roofline import Roofline

m = get_model("tiny-llama")
sizes = (768, 384, 128, 32)
pairs = sum(p * p / 2 for p in sizes)
for f in sys.argv[1:]:
    r = json.load(open(f))
    doc = yaml.safe_load(r["calibration_profile"])
    c = doc["calibration"]
    pre = [PrefillPoint(p["prompt_tokens"], p["cached_tokens"], p["ttft_s"]) for p in c["prefill"]]
    dec = [DecodePoint(d["batch"], d["context_tokens"], d["itl_s"]) for d in c["decode"]]
    out = []
    for att in (True, False):
        cal = fit(get_hardware("cpu"), m, pre, dec, name="x", precision="fp32", attention=att)
        rf = Roofline(cal.hardware, m, 1, "fp32")
        lone = rf.prefill_time_s(768)
        c4 = rf.step_time_s(sum(sizes), 0, 0, 0, prefill_pairs=pairs)
        out.append(f"att {'split' if att else 'x1   '} x{cal.hardware.attention_cost_factor:5.2f} "
                   f"err {cal.median_error:5.1%}/{cal.max_error:5.1%} lone768 {lone*1e3:5.1f} "
                   f"c4step {c4*1e3:5.1f} ratio {c4/lone:4.2f}")
    print(f.split("/")[-1].replace("-report.json", "").ljust(8), " | ".join(out))
