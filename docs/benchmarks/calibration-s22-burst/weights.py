"""Offline: the held-out truths of the stored session-21 reports (the ones with every sample)
recomputed with each probe round's held-out call weighted equally, against the stored
placement-predictor predictions. HeldOut.measure ran 2, 2, 1, 1, 1 repeats after probe rounds
0-4 (share(7, 5, i)); the probe's points weight its 5 rounds equally."""
import glob, json, statistics as st

CALLS = [(0, 2), (2, 4), (4, 5), (5, 6), (6, 7)]  # sample index ranges of each call

def summary(f):
    d = json.load(open(f))
    s = d.get("calibration_held_out_samples_ms")
    if not s:
        return None
    pred = d["calibration_prediction_error"]["predicted_ms"]
    series = [*s["alone"].values()] + [[r[i] for r in s["burst"]] for i in range(3)]
    out = {}
    for name, agg in (("pooled (as stored)", lambda v: st.median(v)),
                      ("round-weighted", lambda v: st.median(st.median(v[a:b]) for a, b in CALLS)),
                      ("without round 0", lambda v: st.median(v[2:]))):
        truth = [agg(v) for v in series]
        errs = [(p - t) / t for p, t in zip(pred, truth)]
        out[name] = (st.median(abs(e) for e in errs), errs)
    return out

if __name__ == "__main__":
    tot = {}
    for f in sorted(glob.glob("docs/benchmarks/calibration-s2*/*report.json")):
        o = summary(f)
        if o is None:
            continue
        print(f.split("/")[-1][:-12], " | ".join(
            f"{k} {m:.3f} [" + " ".join(f"{e:+.2f}" for e in es) + "]" for k, (m, es) in o.items()))
        for k, (m, es) in o.items():
            tot.setdefault(k, []).append((m, es))
    for k, v in tot.items():
        ms = [m for m, _ in v]
        print(f"{k}: median of medians {st.median(ms):.3f}, misses {sum(m > 0.2 for m in ms)} of {len(ms)},"
              " per case median signed " + " ".join(f"{st.median(e[i] for _, e in v):+.3f}" for i in range(6)))
