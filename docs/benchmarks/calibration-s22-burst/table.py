"""The fidelity runs' table of docs/benchmarks.md from the reports and logs in this directory."""
import json, re, statistics as st, sys
from pathlib import Path

sys.path[:0] = ["src", ".", str(Path(__file__).parent)]
from offline import roofline  # noqa: E402
from inferplane.physics.calibration import predict_burst_s  # noqa: E402

here = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
rows = []
for f in sorted(here.glob("*-report.json")):
    tag = f.name[:-len("-report.json")]
    if not re.fullmatch(r"(main|new)\d+", tag):
        continue
    d = json.load(open(f))
    log = (here / f"{tag}.log").read_text()
    m = re.search(r"start (\S+) end (\S+) rc \d+ git (\S+)", log)
    result = "passed" if " passed" in log.splitlines()[-2] else ("skipped (" + (
        "other CPU" if "other work took" in log else "targets") + ")")
    pe = d["calibration_prediction_error"]
    ho = d["calibration_held_out_ms"]
    meas = [*ho["alone"].values(), *ho["burst"]]
    signed = [(p - t) / t for p, t in zip(pe["predicted_ms"], meas)]
    g = d["calibration_workload_gaps"]
    # the physics model told the whole burst, from the run's own profile (main's reports lack it)
    pb = [x * 1e3 for x in predict_burst_s(roofline(d)[0], 3, 320)]
    ps = [(p - t) / t for p, t in zip(pb, meas[3:])]
    phys = {"each_signed": ps,
            "median_with_it": st.median([abs(x) for x in signed[:3]] + [abs(x) for x in ps])}
    rows.append((m.group(1), tag, m.group(3), d["calibration_other_cpu"], pe["median"], signed,
                 phys, g, result))
rows.sort()
print("| run (UTC) | git | other CPU | prediction | errors 96 / 320 / 640 / rank 0 / 1 / 2 | "
      "physics burst ranks (median of six with them) | TTFT P50 / P90 | TPOT P50 / P90 | result |")
print("|---|---|---|---|---|---|---|---|---|")
for t0, tag, git, other, med, s, phys, g, res in rows:
    ph = (" / ".join(f"{x * 100:+.0f}" for x in phys["each_signed"])
          + f" % ({phys['median_with_it']:.1%})")
    print(f"| {t0} | {tag} {git} | {other} | {med:.1%} | "
          + " / ".join(f"{x * 100:+.0f}" for x in s) + f" % | {ph} | "
          f"{g['ttft_p50'] * 100:+.1f} / {g['ttft_p90'] * 100:+.1f} % | "
          f"{g['tpot_p50'] * 100:+.1f} / {g['tpot_p90'] * 100:+.1f} % | {res} |")
for side in ("main", "new"):
    ok = [r for r in rows if r[1].startswith(side) and (r[3] or 0) <= 0.25]
    if ok:
        meds = [r[4] for r in ok]
        per = [st.median(r[5][i] for r in ok) for i in range(6)]
        print(f"{side}: {len(ok)} calm runs, prediction median {st.median(meds):.1%} "
              f"({', '.join(f'{m:.1%}' for m in meds)}), misses {sum(m > 0.2 for m in meds)}; "
              "per case median signed " + " / ".join(f"{x * 100:+.0f}" for x in per) + " %; "
              "with the physics burst: median " + f"{st.median(r[6]['median_with_it'] for r in ok):.1%}"
              + f", misses {sum(r[6]['median_with_it'] > 0.2 for r in ok)}")
