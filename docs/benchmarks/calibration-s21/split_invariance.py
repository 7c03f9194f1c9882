"""Offline: does the placement predictor's held-out prediction depend on how fit_frontend split
the per-request time R between request_overhead_s and the front end's intake? Every stored
fidelity report's profile, its R re-split four ways (R kept), predictions recomputed."""
import glob, json, pathlib, statistics, sys, tempfile
import yaml
from bench.calibration import predicted_ttft_s, emulator_fleet, PROFILE_NAME

KEYS = ("request_overhead_s", "frontend_request_s", "frontend_handoff_s", "frontend_token_s")
tmp = pathlib.Path(tempfile.mkdtemp())
rows = []
for f in sorted(glob.glob(sys.argv[1] + "/calibration-s*/*report.json")) + sys.argv[2:]:
    d = json.load(open(f))
    p = yaml.safe_load(d["calibration_profile"])
    hw = p["hardware"]
    R = sum(hw.get(k, 0.0) for k in KEYS)
    ho = d["calibration_held_out_ms"]
    truth = [*ho["alone"].values(), *ho["burst"]]
    meds = []
    for s, h in ((None, None), (0.0003, 0.0), (0.0, 0.0), (0.5 * R, 0.0), (0.3 * R, 0.3 * R)):
        h2 = dict(hw)
        if s is not None:
            h2.update(frontend_request_s=s, frontend_handoff_s=h,
                      request_overhead_s=R - s - h - hw.get("frontend_token_s", 0.0))
        q = tmp / "p.yaml"
        q.write_text(yaml.safe_dump({**p, "hardware": h2}))
        ft = emulator_fleet(PROFILE_NAME, 9, q)
        pred = [predicted_ttft_s(ft, t) for t in (96, 320, 640)]
        pred += [predicted_ttft_s(ft, 320, k) for k in range(3)]
        meds.append(statistics.median(abs(a * 1e3 - b) / b for a, b in zip(pred, truth)))
    rows.append((f.split("/")[-1], round(R * 1e3, 2), [round(m, 4) for m in meds]))
    print(*rows[-1])
print("max change of the median error over the re-splits:",
      max(max(m) - min(m) for _, _, m in rows))
