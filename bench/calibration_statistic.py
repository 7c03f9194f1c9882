"""bench/calibration_statistic.py: which statistic a calibration prefill point should read from
its tries, judged offline against the real engine on fidelity runs' reports.

    python bench/calibration_statistic.py REPORT.json [REPORT.json ...] [--json OUT]

A report is ``out/fidelity/report.json`` of one fidelity run (``-m fidelity``
``tests/fidelity/test_calibration.py``). Its profile (``calibration_profile``) keeps every cold
prefill try of the probe (``calibration.prefill_tries_ms``, per requested length, in the order
sent; since session 23; reports without it are skipped). For each statistic of
:data:`STATISTICS` the cold prefill points are read again from those tries, the profile is
fitted again with the product's own fit (``fit`` and ``fit_frontend``; the decode, cached, burst
and loaded points as the run measured them, the speed spread kept), and the placement
predictor's TTFT of the refitted profile is set against what the same run measured on the real
engine over the same minutes:

* **held out**: the issue's prediction target, :func:`bench.calibration.held_out_errors`'s
  arithmetic: the lone prompts of :data:`~bench.calibration.HELD_OUT` tokens and each rank of
  the burst (``calibration_held_out_ms``, medians of the run's held-out requests); the run's
  median absolute error;
* **c1**: the fidelity workload's concurrency-1 TTFT per prompt size
  (``calibration_workload_per_size_ms.real.c1``: lone requests of 32-768 tokens), against the
  predictor's lone TTFT at that size; median absolute error.

The cached points' tries are not kept, so both refits keep the cached points as the run
measured them. ``first visits`` is, beside them, the median of each round's first try (the
probe before session 23 took one try a round, at its start, and kept their median; the first
visit of a round here is at the same place, the round around it longer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench.calibration import (  # noqa: E402
    PROFILE_NAME,
    emulator_fleet,
    held_out_errors,
    predicted_ttft_s,
)
from inferplane.physics import get_hardware  # noqa: E402
from inferplane.physics.calibration import (  # noqa: E402
    BurstPoint,
    DecodePoint,
    LoadedPoint,
    PrefillPoint,
    dump_profile,
    fit,
    fit_frontend,
    load_hardware_profile,
)
from inferplane.physics.models import get_model  # noqa: E402

Statistic = Callable[[Sequence[float]], float]

#: The share of the tries the trimmed mean cuts from each end (the probe's in session 23).
TRIM = 0.2


def trimmed_mean(tries: Sequence[float], trim: float = TRIM) -> float:
    """The mean of ``tries`` once ``trim`` of them (rounded down) are cut from each end."""
    if not tries:
        raise ValueError("no tries")
    xs = sorted(tries)
    cut = int(len(xs) * trim)
    return statistics.fmean(xs[cut:len(xs) - cut])


def first_visits_median(tries: Sequence[float], visits: int) -> float:
    """The median of each round's first try: what the probe before session 23 read."""
    return statistics.median(tries[0::visits])


def statistics_for(visits: int) -> dict[str, Statistic]:
    """The statistics compared, by name, for a probe of ``visits`` prefill visits a round."""
    return {
        "median": statistics.median,
        "trimmed mean": trimmed_mean,
        "first visits": lambda ts: first_visits_median(ts, visits),
    }


def cold_points(calibration: dict[str, Any], stat: Statistic) -> list[PrefillPoint]:
    """The profile's prefill points with every cold one read again from its tries by ``stat``
    (the tries are per requested length in the order of the cold points; the points hold the
    engine's own token count); the cached points as they were."""
    tries: dict[Any, list[float]] = calibration["prefill_tries_ms"]
    cold = iter(tries.values())
    out = []
    for p in calibration["prefill"]:
        t = p["ttft_s"]
        if p["cached_tokens"] == 0:
            t = stat(next(cold)) / 1e3
        out.append(PrefillPoint(p["prompt_tokens"], p["cached_tokens"], t))
    if next(cold, None) is not None:
        raise ValueError("more prefill tries than cold prefill points")
    return out


def refit(profile_text: str, prefill: list[PrefillPoint]) -> str:
    """The profile file ``profile_text`` fitted again with ``prefill`` in place of its prefill
    points: everything else (decode, bursts, loaded, speed spread, the meta) as it was."""
    doc = yaml.safe_load(profile_text)
    c = doc["calibration"]
    dec = [DecodePoint(d["batch"], d["context_tokens"], d["itl_s"]) for d in c["decode"]]
    bursts = [BurstPoint(b["size"], b["prompt_tokens"], tuple(b["ttft_s"])) for b in c["bursts"]]
    loaded = [LoadedPoint(p["batch"], p["context_tokens"], p["prompt_tokens"], p["ttft_s"])
              for p in c["loaded"]]
    mp = get_model(c["model_profile"])
    base = doc["hardware"]["base"]
    cal = fit(get_hardware(base), mp, prefill, dec, name=doc["hardware"]["name"], tp=c["tp"],
              precision=c["precision"], source=doc["hardware"]["source"])
    cal = fit_frontend(cal, mp, bursts, loaded, tp=c["tp"], precision=c["precision"])
    h = doc["hardware"]
    cal = dataclasses.replace(cal, hardware=dataclasses.replace(
        cal.hardware, speed_spread=tuple(h.get("speed_spread", ())),
        speed_spread_window_s=h.get("speed_spread_window_s", 0.0)))
    meta = {k: v for k, v in c.items()
            if k not in ("prefill", "decode", "bursts", "loaded", "fit")}
    return dump_profile(cal, base, meta)


def signed_errors(predicted: Sequence[float], measured: Sequence[float]) -> list[float]:
    """``(predicted - measured) / measured``, each."""
    return [(p - m) / m for p, m in zip(predicted, measured, strict=True)]


def median_abs(errors: Sequence[float]) -> float:
    return statistics.median(abs(e) for e in errors)


def judge(report: dict[str, Any]) -> dict[str, Any] | None:
    """One report's real TTFT points and, per statistic, the refitted profile's predictions of
    them and their errors; None when its profile keeps no tries."""
    text = report["calibration_profile"]
    c = yaml.safe_load(text)["calibration"]
    if not c.get("prefill_tries_ms"):
        return None
    held = report["calibration_held_out_ms"]
    alone = [(int(n), t / 1e3) for n, t in held["alone"].items()]
    burst = [t / 1e3 for t in held["burst"]]
    c1 = {int(n): t for n, t in report["calibration_workload_per_size_ms"]["real"]["c1"].items()}
    out: dict[str, Any] = {
        "real_held_out_ms": [round(t * 1e3, 2) for _, t in alone] + held["burst"],
        "held_out_points": [f"{n} alone" for n, _ in alone]
                           + [f"burst rank {k + 1}" for k in range(len(burst))],
        "real_c1_ms": c1,
        "statistics": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, stat in statistics_for(int(c.get("prefill_visits", 1))).items():
            path = Path(tmp) / f"{name.replace(' ', '-')}.yaml"
            path.write_text(refit(text, cold_points(c, stat)))
            fleet = emulator_fleet(PROFILE_NAME, 9, path)
            ho = held_out_errors(fleet, load_hardware_profile(path), alone, burst)
            c1_pred = {n: predicted_ttft_s(fleet, n) * 1e3 for n in c1}
            c1_err = signed_errors(list(c1_pred.values()), list(c1.values()))
            cal = yaml.safe_load(path.read_text())
            out["statistics"][name] = {
                "lone_768_ms": round(next(p["fitted_s"] for p in
                                          reversed(cal["calibration"]["prefill"])
                                          if p["cached_tokens"] == 0) * 1e3, 2),
                "attention": round(cal["hardware"].get("attention_cost_factor", 1.0), 2),
                "held_out_predicted_ms": ho["predicted_ms"],
                "held_out_signed": ho["each_signed"],
                "held_out_median_abs": round(ho["median"], 4),
                "c1_predicted_ms": {n: round(v, 2) for n, v in c1_pred.items()},
                "c1_signed": [round(e, 3) for e in c1_err],
                "c1_median_abs": round(median_abs(c1_err), 4),
            }
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per run and statistic."""
    lines = ["| run | statistic | attention | fitted 768 ms | held-out predicted ms "
             "(real) | signed errors | median abs | c1 predicted ms (real) | c1 median abs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run, r in results.items():
        for name, s in r["statistics"].items():
            real = ", ".join(f"{p:.1f} ({m:.1f})" for p, m in
                             zip(s["held_out_predicted_ms"], r["real_held_out_ms"], strict=True))
            c1 = ", ".join(f"{s['c1_predicted_ms'][n]:.1f} ({m:.1f})"
                           for n, m in r["real_c1_ms"].items())
            signed = " ".join(f"{e:+.1%}" for e in s["held_out_signed"])
            lines.append(f"| {run} | {name} | x{s['attention']:.2f} | {s['lone_768_ms']:.1f} | "
                         f"{real} | {signed} | {s['held_out_median_abs']:.1%} | {c1} | "
                         f"{s['c1_median_abs']:.1%} |")
    return "\n".join(lines)


def summary(results: dict[str, dict[str, Any]], a: str = "median",
            b: str = "trimmed mean") -> dict[str, Any]:
    """Per yardstick (held out, c1), ``b``'s median absolute error less ``a``'s in each run (so
    negative: ``b`` closer), how many runs each was closer in, and the mean of each's; and over
    every real point of every run (``points``; the errors as rounded in the results), how
    many each statistic predicted closer."""
    out: dict[str, Any] = {}
    points = [abs(eb) - abs(ea) for r in results.values()
              for k in ("held_out_signed", "c1_signed")
              for ea, eb in zip(r["statistics"][a][k], r["statistics"][b][k], strict=True)]
    out["points"] = {f"{a} closer": sum(d > 0 for d in points),
                     f"{b} closer": sum(d < 0 for d in points),
                     "tied": sum(d == 0 for d in points)}
    for key in ("held_out_median_abs", "c1_median_abs"):
        diffs = [r["statistics"][b][key] - r["statistics"][a][key] for r in results.values()]
        out[key] = {
            f"{b} - {a}": [round(d, 4) for d in diffs],
            f"{a} closer": sum(d > 0 for d in diffs),
            f"{b} closer": sum(d < 0 for d in diffs),
            f"mean {a}": round(statistics.fmean(r["statistics"][a][key]
                                                for r in results.values()), 4),
            f"mean {b}": round(statistics.fmean(r["statistics"][b][key]
                                                for r in results.values()), 4),
        }
    return out


def label(report: Path) -> str:
    """A run's name: its directory's (``calibration-s24/main1/report.json``: ``s24/main1``) or
    its file's (``calibration-s23/new1-report.json``: ``s23/new1``), under the last part of the
    folder's name that holds them."""
    if report.name == "report.json" and report.parent.name:
        run, folder = report.parent.name, report.parent.parent.name
    else:
        run, folder = report.stem.removesuffix("-report"), report.parent.name
    return f"{folder.rsplit('-', 1)[-1]}/{run}" if folder else run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    for f in args.reports:
        r = judge(json.loads(f.read_text()))
        if r is None:
            print(f"{f}: no prefill tries kept, skipped", file=sys.stderr)
            continue
        results[label(f)] = r
    if not results:
        print("no report keeps prefill tries", file=sys.stderr)
        return 1
    print(table(results))
    s = summary(results)
    print(json.dumps(s, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "summary": s}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
