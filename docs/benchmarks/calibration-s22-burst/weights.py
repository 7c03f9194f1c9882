"""Offline: the held-out truths of stored reports that keep every sample (session 21's, by
default; session 22's main*/new* with a GLOB argument) recomputed with each probe round's
held-out call weighted equally, against the stored placement-predictor predictions.
Until session 22 HeldOut.measure ran 2, 2, 1, 1, 1 repeats after probe rounds 0-4
(share(7, 5, i)); from session 22 (bench.calibration.HELD_OUT_PER_ROUND) 2 after each.
The probe's points weight its 5 rounds equally.

Statistics (each the held-out truth of each of the six cases):
- "pooled (as stored)": the median over all samples, as the bench computes it;
- "round-weighted": the median of the per-call medians (calls of 2, 2, 1, 1, 1);
- "one per round": the median of the first sample after each round (5 samples), each round
  alike like the bench's estimator from session 22 (which pools 2 per round: with 2, 2, 2, 2, 2
  samples "pooled" *is* that estimator, and "round-weighted" the median of 5 pair means);
- "without round 0": the pooled median of the samples after rounds 1-4.
    PYTHONPATH=src:. python docs/benchmarks/calibration-s22-burst/weights.py [GLOB ...]
"""
import glob, json, statistics as st, sys

ROUNDS = 5  # the fidelity test's and the bench's default probe rounds
DEFAULT = ["docs/benchmarks/calibration-s2[01]/*report.json"]  # the files weights.txt was run on


def calls(d, n):
    """Sample index ranges of each probe round's held-out call: the report's own
    held_out_per_round where stored, else share(n, 5) as the bench did (7: 2, 2, 1, 1, 1)."""
    per = d.get("calibration_held_out_per_round")
    sizes = [per] * ROUNDS if per else [n // ROUNDS + (i < n % ROUNDS) for i in range(ROUNDS)]
    if sum(sizes) != n or n not in (7, 10):  # 7: until session 22; 10: 2 a round
        raise ValueError(f"{n} samples: not 5 probe rounds' held-out calls this script knows")
    edges = [sum(sizes[:i]) for i in range(ROUNDS + 1)]
    return list(zip(edges, edges[1:]))


def summary(f):
    d = json.load(open(f))
    s = d.get("calibration_held_out_samples_ms")
    if not s:
        return None
    pred = d["calibration_prediction_error"]["predicted_ms"]
    series = [*s["alone"].values()] + [[r[i] for r in s["burst"]] for i in range(3)]
    lens = {len(v) for v in series}
    assert len(lens) == 1, (f, lens)
    cs = calls(d, lens.pop())
    out = {}
    for name, agg in (("pooled (as stored)", lambda v: st.median(v)),
                      ("round-weighted", lambda v: st.median(st.median(v[a:b]) for a, b in cs)),
                      ("one per round", lambda v: st.median(v[a] for a, _ in cs)),
                      ("without round 0", lambda v: st.median(v[cs[1][0]:]))):
        truth = [agg(v) for v in series]
        errs = [(p - t) / t for p, t in zip(pred, truth)]
        out[name] = (st.median(abs(e) for e in errs), errs)
    return out


if __name__ == "__main__":
    tot = {}
    pats = sys.argv[1:] or DEFAULT
    for f in sorted(f for p in pats for f in glob.glob(p)):
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
