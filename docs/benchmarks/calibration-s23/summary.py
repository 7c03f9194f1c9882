"""Offline: one line per fidelity run of this directory (`*-report.json`, with its `.log`).

    python docs/benchmarks/calibration-s23/summary.py   (no project imports; reads JSON only)

Per run: the emulator's gaps (TTFT P50 / P90, TPOT P50 / P90, signed, median over rounds as the
test reports them), the real engine's control (odd vs even rounds) on TTFT P50, the real TTFT P50,
the probe's lone 768-token point and the fit's attention factor (`calibration_fit_points`,
`calibration_fit`), the probe's own time where the profile carries it (`calibration.probe_s`,
this branch), the time between a probe round's last real workload round and the next one's first
less the median spacing of the real rounds within a probe round (held-out requests + one probe
round: the same held-out work on both sides, so the difference between sides is the probe
round's), the pytest run's duration, and for this branch the 768-token point's tries (ms, in
the order sent) with how many of them are above the median of all 15 by more than 20 %.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def probe_round_gap(r: dict) -> float | None:
    at, after = r["calibration_round_at_s"]["real"], r["calibration_round_at_s"][
        "real_after_probe_round"]
    groups: dict[int, list[float]] = {}
    for t, a in zip(at, after, strict=True):
        groups.setdefault(a, []).append(t)
    keys = sorted(k for k in groups if k >= 0)
    inner = [b - a for k in keys for a, b in zip(groups[k], groups[k][1:], strict=False)]
    if not inner or len(keys) < 2:
        return None
    spacing = statistics.median(inner)
    gaps = [groups[k2][0] - groups[k1][-1] - spacing for k1, k2 in itertools.pairwise(keys)]
    return statistics.median(gaps)


def main() -> None:
    rows = []
    for f in sorted(HERE.glob("*-report.json")):
        tag = f.name[: -len("-report.json")]
        r = json.loads(f.read_text())
        g = r["calibration_workload_gaps"]
        # the fit's line; the last line of the summary when no warning follows it
        fit = " ".join([*r["calibration_fit_points"], r["calibration_fit"]])
        att = re.search(r"attention x([0-9.]+)", fit)
        lone = next(float(line.split()[3]) for line in r["calibration_fit_points"]
                    if line.startswith("prefill 768 tok ") and "cached" not in line)
        prof = yaml.safe_load(r["calibration_profile"])["calibration"]
        log = (HERE / f"{tag}.log").read_text() if (HERE / f"{tag}.log").exists() else ""
        dur = re.search(r" in ([0-9.]+)s", log)
        start = re.search(r"START (\S+) (\S+)", log)
        tries = prof.get("prefill_tries_ms", {}).get(768)
        real = r["calibration_workload_ms"]["real"]["ttft_p50"]
        rows.append((tag, start.group(1)[11:19] if start else "?",
                     start.group(2) if start else "?", g, r["calibration_control"].get("ttft_p50"),
                     real, lone, float(att.group(1)) if att else None, prof.get("probe_s"),
                     probe_round_gap(r), float(dur.group(1)) if dur else None, tries,
                     r.get("calibration_other_cpu")))
    print("| run | start UTC | commit | TTFT P50 | TTFT P90 | TPOT P50 | TPOT P90 "
          "| control TTFT P50 | real TTFT P50 ms | probe lone 768 ms | attention | probe s "
          "| held-out + probe round s | pytest s | other CPU |")
    print("|---" * 15 + "|")
    for (tag, at, commit, g, ctl, real, lone, att, probe_s, gap, dur, _, other) in rows:
        print(f"| {tag} | {at} | {commit} | {g['ttft_p50']:+.1%} | {g['ttft_p90']:+.1%} | "
              f"{g['tpot_p50']:+.1%} | {g['tpot_p90']:+.1%} | "
              f"{'' if ctl is None else f'{ctl:+.1%}'} | {real:.1f} | {lone:.1f} | x{att:g} | "
              f"{'' if probe_s is None else probe_s} | {'' if gap is None else f'{gap:.1f}'} | "
              f"{'' if dur is None else f'{dur:.0f}'} | {other} |")
    print()
    for (tag, *_, tries, _o) in rows:
        if tries:
            med = statistics.median(tries)
            slow = sum(t > 1.2 * med for t in tries)
            print(f"{tag}: 768 tries {[round(t, 1) for t in tries]}; median {med:.1f}, "
                  f"mean {statistics.fmean(tries):.1f}, >1.2x median: {slow}")


if __name__ == "__main__":
    main()
