"""Offline, for this branch's runs (their profiles carry every cold prefill try): each prefill
point as the old probe would have read it in the same run, beside what the new one reads, and
the fit under each.

The old probe took one try of each prompt length a round, at the round's start, and kept the
median of the 5; the first visit of each round here (tries 0, 3, 6, 9, 12) is taken at the same
place, so the median of those 5 is what the old statistic would have read from this run's
engine (the old round was shorter, without the two later visits: close, not the same). The
cached points' tries are not stored, so the refit keeps them as this run measured them (the
trimmed mean) under both.

    PYTHONPATH=src:. python docs/benchmarks/calibration-s23/within_run.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import yaml

from bench.calibration_statistic import trimmed_mean as typical_s  # session 23's statistic
from inferplane.physics import get_hardware
from inferplane.physics.calibration import DecodePoint, PrefillPoint, fit
from inferplane.physics.models import get_model
from inferplane.physics.probe import PREFILL_VISITS

HERE = Path(__file__).resolve().parent


def refit(c: dict, cold: dict[int, float]) -> tuple[float, float]:
    pre = []
    for p in c["prefill"]:
        t = p["ttft_s"]
        if p["cached_tokens"] == 0:
            t = cold[p["prompt_tokens"]]
        pre.append(PrefillPoint(p["prompt_tokens"], p["cached_tokens"], t))
    dec = [DecodePoint(d["batch"], d["context_tokens"], d["itl_s"]) for d in c["decode"]]
    cal = fit(get_hardware("cpu"), get_model(c["model_profile"]), pre, dec, name="refit",
              tp=c["tp"], precision=c["precision"])
    lone = max((p.prompt_tokens, f) for p, f in cal.prefill if p.cached_tokens == 0)[1]
    return cal.hardware.attention_cost_factor, lone * 1e3


def main() -> None:
    for f in sorted(HERE.glob("*-report.json")):
        r = json.loads(f.read_text())
        c = yaml.safe_load(r["calibration_profile"])["calibration"]
        tries = c.get("prefill_tries_ms")
        if not tries:
            continue
        # requested length -> the engine's token count, as the profile's points hold it
        counted = [p["prompt_tokens"] for p in c["prefill"] if p["cached_tokens"] == 0]
        old, new, med = {}, {}, {}
        print(f"{f.name[:-len('-report.json')]}:")
        for (n, ts), tokens in zip(tries.items(), counted, strict=True):
            first = ts[0::PREFILL_VISITS]
            old[tokens] = statistics.median(first) / 1e3
            new[tokens] = typical_s(ts) / 1e3
            med[tokens] = statistics.median(ts) / 1e3
            print(f"  {n:>4} tok: first visits {[round(t, 1) for t in first]} median "
                  f"{old[tokens] * 1e3:.1f}; all 15 median {med[tokens] * 1e3:.1f}, trimmed mean "
                  f"{new[tokens] * 1e3:.1f}, mean {statistics.fmean(ts):.1f}")
        for label, cold in (("old statistic (first visits' median)", old),
                            ("median of all 15", med), ("new (trimmed mean of 15)", new)):
            att, lone = refit(c, cold)
            print(f"  fit with {label}: attention x{att:.2f}, lone 768 fitted {lone:.1f} ms")
        # what the visits after each round's first cost: their cold tries, and a cached try
        # per length each at its point's value (the cached tries themselves are not stored)
        cold_s = sum(t for ts in tries.values() for i, t in enumerate(ts)
                     if i % PREFILL_VISITS) / 1e3
        cached_s = (len(next(iter(tries.values()))) // PREFILL_VISITS * (PREFILL_VISITS - 1)
                    * sum(p["ttft_s"] for p in c["prefill"] if p["cached_tokens"]))
        print(f"  probe {c['probe_s']} s, of it the later visits ~{cold_s + cached_s:.1f} s "
              f"({cold_s:.1f} cold + ~{cached_s:.1f} cached, before the HTTP round trips)")
        print(f"  real workload c1 768 {r['calibration_workload_per_size_ms']['real']['c1']['768']}"
              f" ms, emulator {r['calibration_workload_per_size_ms']['calibrated']['c1']['768']}")


if __name__ == "__main__":
    main()
