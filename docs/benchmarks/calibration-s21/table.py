import json, sys, re
print("| run (UTC) | git | other CPU | prediction | errors 96 / 320 / 640 / rank 0 / 1 / 2 | TTFT P50 / P90 | TPOT P50 / P90 | control TTFT P50 / P90, TPOT P50 / P90 | fit: wait / s / h / t ms | result |")
print("|---|---|---|---|---|---|---|---|---|---|")
for t in sys.argv[1:]:
    d = json.load(open(f"/work/exp/calib21/{t}.report.json"))
    log = open(f"/work/exp/calib21/{t}.log").read()
    when = re.search(r"start (\S+) end (\S+)", log).groups()
    last = [l for l in log.splitlines() if l.startswith("SKIPPED") or " passed" in l or "failed" in l]
    if any("other work took" in l for l in last): res = "skipped (other CPU)"
    elif any("targets not met" in l for l in last):
        res = "skipped (" + ", ".join(sorted(set(re.findall(r"'(t\w+_p\d0)'", " ".join(last))) | ({"prediction"} if d["calibration_prediction_error"]["median"] > 0.2 else set()))) + ")"
    else: res = "passed"
    pe = d["calibration_prediction_error"]; ho = d["calibration_held_out_ms"]
    truth = [*ho["alone"].values(), *ho["burst"]]
    signed = [(p - q) / q * 100 for p, q in zip(pe["predicted_ms"], truth)]
    g = d["calibration_workload_gaps"]; c = d["calibration_control"]
    m = re.search(r"per request ([\d.]+) ms, front-end intake ([\d.]+) ms \+ hand-off ([\d.]+) ms, per token ([\d.]+)", d["calibration_fit"])
    git = "branch" if t.startswith("new") else "main 46945c5"
    pct = lambda x: f"{x*100:+.1f}"
    print(f"| {when[0]}-{when[1]} | {git} | {d['calibration_other_cpu']} | {'**' if pe['median']>0.2 else ''}{pe['median']*100:.1f} %{'**' if pe['median']>0.2 else ''} | "
          + " / ".join(f"{x:+.0f}" for x in signed) + " % | "
          f"{pct(g['ttft_p50'])} / {pct(g['ttft_p90'])} % | {pct(g['tpot_p50'])} / {pct(g['tpot_p90'])} % | "
          f"{pct(c['ttft_p50'])} / {pct(c['ttft_p90'])}, {pct(c['tpot_p50'])} / {pct(c['tpot_p90'])} % | "
          f"{' / '.join(m.groups())} | {res} |")
