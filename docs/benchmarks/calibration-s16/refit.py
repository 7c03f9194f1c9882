"""Offline (session 16, engineer calib): refit each stored run's probe points with a checkout's
model; print the front end's split, the probe's burst of 4 x 64 tokens measured and as the fit
predicts it, the loaded point, and the held-out prediction error against the run's measured.

    cd CHECKOUT && PYTHONPATH=src:. python docs/benchmarks/calibration-s16/refit.py REPORT.json...
"""
import json, sys, glob, statistics, tempfile
from pathlib import Path
import yaml
from bench.calibration import predicted_ttft_s, emulator_fleet, HELD_OUT_BURST
from inferplane.physics.calibration import (fit, fit_frontend, PrefillPoint, DecodePoint,
    BurstPoint, LoadedPoint, dump_profile, predict_burst_s)
from inferplane.physics.hardware import get_hardware
from inferplane.physics.models import get_model
from inferplane.physics.roofline import Roofline

for f in sys.argv[1:]:
    r = json.load(open(f))
    text = r["calibration_profile"]
    doc = yaml.safe_load(text); c = doc["calibration"]
    pre = [PrefillPoint(p["prompt_tokens"], p["cached_tokens"], p["ttft_s"]) for p in c["prefill"]]
    dec = [DecodePoint(d["batch"], d["context_tokens"], d["itl_s"]) for d in c["decode"]]
    bursts = [BurstPoint(b["size"], b["prompt_tokens"], tuple(b["ttft_s"])) for b in c["bursts"]]
    loaded = [LoadedPoint(p["batch"], p["context_tokens"], p["prompt_tokens"], p["ttft_s"]) for p in c["loaded"]]
    mp = get_model(c["model_profile"])
    cal = fit(get_hardware(doc["hardware"]["base"]), mp, pre, dec, name="cpu-fidelity", tp=c["tp"], precision=c["precision"])
    cal = fit_frontend(cal, mp, bursts, loaded, tp=c["tp"], precision=c["precision"])
    h = cal.hardware
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "p.yaml"; p.write_text(dump_profile(cal, doc["hardware"]["base"], c))
        ft = emulator_fleet("cpu-fidelity", 9, p)
        ho = r["calibration_held_out_ms"]
        alone = sorted((int(k), v) for k, v in ho["alone"].items())
        pred = [predicted_ttft_s(ft, t) for t, _ in alone] + [predicted_ttft_s(ft, HELD_OUT_BURST[1], k) for k in range(HELD_OUT_BURST[0])]
        truth = [v / 1e3 for _, v in alone] + [v / 1e3 for v in ho["burst"]]
        errs = [abs(a - b) / b for a, b in zip(pred, truth)]
    r0 = Roofline(h, mp, c["tp"], c["precision"])
    print(Path(f).parent.name if 'report' in Path(f).name else f,
          "s %.2f h %.2f t %.3f w %.2f ms" % (h.frontend_request_s*1e3, h.frontend_handoff_s*1e3, h.frontend_token_s*1e3, h.request_overhead_s*1e3),
          "| burst4x64 real", [round(x*1e3,1) for x in bursts[0].ttft_s], "model", [round(x*1e3,1) for x in predict_burst_s(r0, 4, 64)],
          "| loaded real %.1f model %.1f" % (loaded[0].ttft_s*1e3, cal.loaded[0][1]*1e3),
          "| pred err median %.1f%%" % (100*statistics.median(errs)), [round(e,3) for e in errs],
          "stored", r["calibration_prediction_error"]["median"].__round__(3))
    print("   predicted ms", [round(x*1e3,2) for x in pred], "truth", [round(x*1e3,2) for x in truth])
