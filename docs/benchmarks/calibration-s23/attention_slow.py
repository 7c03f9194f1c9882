"""Offline: what the fit does when the probe's long prefill points caught a slow state.

Each of session 22's fast-probe profiles (attention x1) is refitted from its own probe points
(`refit`, as `physics.calibration.fit` does in `calibrate_endpoint`), then again with
(a) every point 1.4x slower (a slow host throughout), (b) only the 512- and 768-token cold points
1.4x slower (the long points' medians caught the slow state, the short ones did not: what a
median of 5 tries a point can do when each point's tries land independently), (c) only the
768-token point. Prints the fitted attention factor and the lone 768's fitted TTFT.

    PYTHONPATH=src:. python docs/benchmarks/calibration-s23/attention_slow.py
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from inferplane.physics import get_hardware
from inferplane.physics.calibration import DecodePoint, PrefillPoint, fit
from inferplane.physics.models import get_model

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "base1": ROOT / "calibration-s22/base1-report.json",
    "base2": ROOT / "calibration-s22/base2-report.json",
    "persize1": ROOT / "calibration-s22/persize1-report.json",
    "main3": ROOT / "calibration-s22-burst/main3-report.json",
    "new1": ROOT / "calibration-s22-burst/new1-report.json",
    "new2": ROOT / "calibration-s22-burst/new2-report.json",
    "main1 (slow)": ROOT / "calibration-s22-burst/main1-report.json",
    "new3 (slow)": ROOT / "calibration-s22-burst/new3-report.json",
}
SLOW = 1.4


def refit(doc: dict, scale) -> tuple[float, float]:
    c = doc["calibration"]
    pre = [PrefillPoint(p["prompt_tokens"], p["cached_tokens"],
                        p["ttft_s"] * scale(p["prompt_tokens"], p["cached_tokens"]))
           for p in c["prefill"]]
    dec = [DecodePoint(d["batch"], d["context_tokens"], d["itl_s"] * scale(0, 0))
           for d in c["decode"]]
    cal = fit(get_hardware(doc["hardware"]["base"]), get_model(c["model_profile"]), pre, dec,
              name="refit", tp=c["tp"], precision=c["precision"])
    lone = next(f for p, f in cal.prefill if p.cached_tokens == 0 and p.prompt_tokens > 700)
    return cal.hardware.attention_cost_factor, lone * 1e3


def main() -> None:
    cases = {
        "as probed": lambda n, c: 1.0,
        f"all x{SLOW}": lambda n, c: SLOW,
        f"512+768 cold x{SLOW}": lambda n, c: SLOW if c == 0 and n >= 500 else 1.0,
        f"768 cold x{SLOW}": lambda n, c: SLOW if c == 0 and n >= 700 else 1.0,
    }
    print(f"{'run':<14}" + "".join(f"{k:>26}" for k in cases))
    for name, path in RUNS.items():
        if not path.exists():
            continue
        doc = yaml.safe_load(json.loads(path.read_text())["calibration_profile"])
        cells = [refit(doc, f) for f in cases.values()]
        print(f"{name:<14}" + "".join(f"{f'x{a:.2f} / {t:.1f} ms':>26}" for a, t in cells))


if __name__ == "__main__":
    main()
