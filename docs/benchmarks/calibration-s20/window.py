"""Session 20 (engineer calib20), offline: would a shorter speed-spread window reproduce more of
the real per-token tail? No engine: session 19's token-level diagnostic (every chunk's arrival
time of 20 rounds of the fidelity workload and of the decode probe's batches, on the calm host,
`calibration-s19/tokens-154600.json`) is taken as the engine's own progress, and session 19's
real-time neighbour (`calibration-s19/noise.py`: the engine core gets nothing for 50-400 ms every
0.5-2.5 s) is put into it as stalls: every token after a stall's start comes that much later.

On that noisy timeline the probe's streams give speed-spread factors by one of the methods below;
an emulator that plays the factors back is another time warp of the same calm timeline (a window
of factor f runs the engine at 1/f of its speed), with its own windows (seeded, not aligned with
the noise). Compared: the workload's TPOT P90 over its "flat" P90 (every stream replaced by its
level's median in its round; median over rounds, as `calibration-s19/tails.py`), and the share of
streams over 1.25x their level's round median, real (noisy) against played back.

Methods (factor sources):
  stream   one factor per decode point and round: the point's ITL (median over its batch's
           streams) over the point's median over rounds, over the round's median (session 19's
           `calibration.speed_spread`); window: a probe stream's typical decode (63 steps)
  kN       windows of N tokens inside each point's first stream: each window's time over the
           point's typical window (median over rounds of the stream's median window), over the
           round's median; window: N typical steps
Playback:
  wall     fixed windows of engine time (session 19's `SpeedSpread`): a window of factor f
           does W/f of the typical work
  work     windows of typical work: a window of factor f lasts f x W of engine time, so a
           sampled stretch is played back with the delay it had

    python docs/benchmarks/calibration-s20/window.py [TOKENS.json|-] [stalls|halves]
"""
import bisect
import json
import random
import statistics as st
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PATH = Path(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] != "-" else HERE.parent / "calibration-s19" / "tokens-154600.json"
NOISE_SEEDS = range(1, 9)
EMU_SEEDS = range(40)


def pct(xs, q):
    return st.quantiles(xs, n=100, method="inclusive")[q - 1]


def token_times(r):
    """Absolute arrival time of each output token (a chunk of n words: n tokens at once)."""
    out = []
    for t, w in r["chunks"]:
        out += [r["sent"] + t] * max(1, w)
    n = r["completion_tokens"]
    return (out + [out[-1]] * n)[:n]


class Warp:
    """A monotone map from calm (progress) time to wall time: piecewise linear, given as
    segments (progress length, wall length)."""

    def __init__(self, t0, segments):
        self.p, self.w = [t0], [t0]
        for dp, dw in segments:
            self.p.append(self.p[-1] + dp)
            self.w.append(self.w[-1] + dw)

    def __call__(self, t):
        i = bisect.bisect_right(self.p, t) - 1
        i = min(max(i, 0), len(self.p) - 2)
        dp = self.p[i + 1] - self.p[i]
        if dp == 0:  # a stall: progress resumes at its end
            return self.w[i + 1] + (t - self.p[i])
        return self.w[i] + (t - self.p[i]) * (self.w[i + 1] - self.w[i]) / dp


def stalls(t0, horizon, seed):
    """noise.py's pattern: busy 50-400 ms (the engine core gets nothing), then 0.5-2.5 s off,
    starting at a random phase."""
    rng = random.Random(seed)
    segs = [(rng.uniform(0, 2.5), None)]
    segs[0] = (segs[0][0], segs[0][0])
    p = segs[0][0]
    while p < horizon:
        segs.append((0.0, rng.uniform(0.05, 0.4)))
        off = rng.uniform(0.5, 2.5)
        segs.append((off, off))
        p += off
    return Warp(t0, segs)


def halves(t0, horizon, seed):
    """A neighbour that shares the core: for 0.3-3 s the engine runs at half speed, then 1-5 s
    at full speed (not session 19's; a check that the methods hold for longer, milder stretches)."""
    rng = random.Random(seed)
    segs, p = [], 0.0
    while p < horizon:
        on, off = rng.uniform(0.3, 3.0), rng.uniform(1.0, 5.0)
        segs += [(on / 2, on), (off, off)]
        p += on / 2 + off
    return Warp(t0, segs)


NEIGHBOURS = {"stalls": stalls, "halves": halves}


def emulator(t0, horizon, factors, window, seed, mode):
    rng = random.Random(seed)
    segs, p = [], 0.0
    phase = rng.uniform(0, window)  # the emulator's windows start when it does
    segs.append((phase, phase))
    p = phase
    while p < horizon:
        f = rng.choice(factors)
        if mode == "wall":
            segs.append((window / f, window))
            p += window / f
        else:
            segs.append((window, window * f))
            p += window
    return Warp(t0, segs)


def workload_stats(recs, warp):
    """Of the workload on a warped timeline: (P90 over flat, share > 1.25x per level c1 c2 c4,
    TPOT P90 (median over rounds of each round's), pooled ratios to the level's round median)."""
    tp = []
    for r in recs:
        tt = [warp(t) for t in r["tt"]]
        tp.append((r["round"], r["c"], (tt[-1] - tt[0]) / (len(tt) - 1)))
    over, share, p90, ratios = [], {1: [], 2: [], 4: []}, [], []
    for rd in sorted({x[0] for x in tp}):
        xs = [x for x in tp if x[0] == rd]
        med = {c: st.median(t for _, cc, t in xs if cc == c) for c in (1, 2, 4)}
        p90.append(pct([t for *_, t in xs], 90))
        over.append(p90[-1] / pct([med[c] for _, c, _ in xs], 90))
        for _, c, t in xs:
            share[c].append(t / med[c] > 1.25)
            ratios.append(t / med[c])
    return (st.median(over) - 1, {c: sum(v) / len(v) for c, v in share.items()}, st.median(p90),
            ratios)


def factors_of(probes, warp, method):
    """The speed spread the probe would fit on the warped timeline."""
    points = sorted({p["batch"] for p in probes})
    rounds = sorted({p["round"] for p in probes})
    if method == "stream":
        itl = {}
        for b in points:
            for rd in rounds:
                xs = [p for p in probes if p["batch"] == b and p["round"] == rd]
                itl[b, rd] = st.median(
                    (warp(p["tt"][-1]) - warp(p["tt"][0])) / (len(p["tt"]) - 1) for p in xs)
        per_point = {b: st.median(itl[b, rd] for rd in rounds) for b in points}
        out = []
        for rd in rounds:
            col = [itl[b, rd] / per_point[b] for b in points]
            m = st.median(col)
            out += [x / m for x in col]
        window = st.median(per_point.values()) * 63
        return out, window
    n = int(method[1:])
    wins = {}
    for b in points:
        for rd in rounds:
            p = next(p for p in probes if p["batch"] == b and p["round"] == rd)
            tt = [warp(t) for t in p["tt"]]
            wins[b, rd] = [tt[i + n] - tt[i] for i in range(0, len(tt) - n, n)]
    typical = {b: st.median(st.median(wins[b, rd]) for rd in rounds) for b in points}
    out = []
    for rd in rounds:
        drift = st.median(st.median(wins[b, rd]) / typical[b] for b in points)
        out += [w / typical[b] / drift for b in points for w in wins[b, rd]]
    window = st.median(typical.values())
    return out, window


def main():
    d = json.loads(PATH.read_text())
    recs, probes = d["recs"], d["probes"]
    for r in recs + probes:
        r["tt"] = token_times(r)
    t0 = min(r["sent"] for r in recs + probes) - 1.0
    horizon = max(r["tt"][-1] for r in recs + probes) - t0 + 5.0
    ident = Warp(t0, [(horizon, horizon)])
    calm_over, calm_share, calm_p90, _ = workload_stats(recs, ident)
    print(f"data {PATH.name}: {len(recs)} workload streams, {len(probes)} probe streams, "
          f"{len({r['round'] for r in recs})} rounds")
    print(f"calm: real P90 over flat {calm_over:+.1%}, > 1.25x c1/c2/c4 "
          + " / ".join(f"{v:.0%}" for v in calm_share.values()))
    methods = ["stream", "k32", "k16", "k8", "k4"]
    rows = {(m, mode): [] for m in methods for mode in ("wall", "work")}
    reals, fstats = [], {m: [] for m in methods}
    neighbour = NEIGHBOURS[sys.argv[2] if len(sys.argv) > 2 else "stalls"]
    print(f"neighbour: {neighbour.__name__}")
    for ns in NOISE_SEEDS:
        noisy = neighbour(t0, horizon, ns)
        real_over, real_share, real_p90, real_ratios = workload_stats(recs, noisy)
        reals.append((real_over, real_share, real_p90, real_ratios))
        for m in methods:
            fs, window = factors_of(probes, noisy, m)
            fstats[m].append((len(fs), window, pct(fs, 90), st.fmean(fs), max(fs)))
            for mode in ("wall", "work"):
                got = [workload_stats(recs, emulator(t0, horizon, fs, window, 1000 * ns + es, mode))
                       for es in EMU_SEEDS[:10]]
                pooled = [x for g in got for x in g[3]]
                rows[m, mode].append((real_over, st.median(g[0] for g in got),
                                      st.fmean(st.fmean(g[1].values()) for g in got),
                                      st.median(g[2] for g in got) / real_p90 - 1,
                                      pct(pooled, 90), pct(pooled, 95), pct(pooled, 98),
                                      sum(x > 1.5 for x in pooled) / len(pooled),
                                      sum(x > 2 for x in pooled) / len(pooled)))
        print(f"noise seed {ns}: real P90 over flat {real_over:+.1%}, > 1.25x c1/c2/c4 "
              + " / ".join(f"{v:.0%}" for v in real_share.values()), flush=True)
    print("\nfactors (median over noise seeds): count, window ms, P90, mean, max")
    for m in methods:
        xs = fstats[m]
        print(f"  {m:7s} {xs[0][0]:4d} {st.median(x[1] for x in xs) * 1e3:7.1f} "
              f"{st.median(x[2] for x in xs):6.3f} {st.median(x[3] for x in xs):6.3f} "
              f"{st.median(x[4] for x in xs):6.2f}")
    real_med = st.median(r[0] for r in reals)
    real_sh = st.median(st.fmean(r[1].values()) for r in reals)
    pooled = [x for r in reals for x in r[3]]
    print(f"\nreal (noisy), over {len(reals)} noise seeds: P90 over flat {real_med:+.1%} (median); "
          f"streams > 1.25x {real_sh:.1%}; stream / level median pooled P90 {pct(pooled, 90):.3f}"
          f" P95 {pct(pooled, 95):.3f} P98 {pct(pooled, 98):.3f}; > 1.5x "
          f"{sum(x > 1.5 for x in pooled) / len(pooled):.1%}, > 2x "
          f"{sum(x > 2 for x in pooled) / len(pooled):.1%}")
    print("method  playback | emulated P90 over flat (median) | streams > 1.25x | "
          "TPOT P90 gap to real, median [min, max] over noise seeds | pooled ratio P90 / P95 / P98 |"
          " > 1.5x | > 2x")
    for (m, mode), xs in rows.items():
        gaps = [x[3] for x in xs]
        print(f"  {m:7s} {mode:5s} {st.median(x[1] for x in xs):+8.1%} "
              f"{st.median(x[2] for x in xs):8.1%}   {st.median(gaps):+6.1%} "
              f"[{min(gaps):+6.1%}, {max(gaps):+6.1%}]   {st.median(x[4] for x in xs):.3f} / "
              f"{st.median(x[5] for x in xs):.3f} / {st.median(x[6] for x in xs):.3f}   "
              f"{st.median(x[7] for x in xs):.1%}  {st.median(x[8] for x in xs):.1%}")
    # the calm host: what each method's factors do where the real engine has no tail
    print("\ncalm host (no stalls): factors P90 / mean / max, emulated P90 over flat, > 1.25x")
    for m in methods:
        fs, window = factors_of(probes, ident, m)
        for mode in ("wall", "work"):
            got = [workload_stats(recs, emulator(t0, horizon, fs, window, es, mode))
                   for es in EMU_SEEDS[:10]]
            gap = st.median(g[2] for g in got) / calm_p90 - 1
            print(f"  gap {gap:+.1%}", end="")
            print(f"  {m:7s} {mode:5s} {pct(fs, 90):.3f} / {st.fmean(fs):.3f} / {max(fs):.2f}  "
                  f"{st.median(g[0] for g in got):+.1%}  "
                  f"{st.fmean(st.fmean(g[1].values()) for g in got):.1%}")


if __name__ == "__main__":
    main()
