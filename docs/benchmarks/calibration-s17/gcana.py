import json, sys, glob, statistics as st, os
d = sys.argv[1]
R = json.load(open(f"{d}/recs.json")); recs, pids = R["recs"], R["pids"]
gcs = {}
for f in glob.glob(f"{d}/gc-*.log"):
    pid = f.split("-")[-1][:-4]
    rows = [tuple(map(float, l.split()[:3])) for l in open(f)]
    gcs[pid] = rows
    name = pids.get(pid, pids.get(int(pid), "?")) if isinstance(pids, dict) else "?"
    durs = [r[1] for r in rows]
    t0 = min(r["sent"] for r in recs); t1 = max(r["sent"] + r["ttft"] + r["span"] for r in recs)
    inwin = [r for r in rows if t0 <= r[0] <= t1]
    print(f"pid {pid} {name}: {len(rows)} gcs > 0.3 ms, {len(inwin)} during the workload ({t1-t0:.1f} s); "
          f"durations in window (ms): gen counts {[sum(1 for r in inwin if r[2]==g) for g in (0,1,2)]}, "
          f"max {max([r[1] for r in inwin], default=0):.1f}, sum {sum(r[1] for r in inwin):.1f}, "
          f"top {sorted([round(r[1],1) for r in inwin])[-8:]}")
# per request: overlap with any gc of any vLLM process during [sent, sent+ttft]
base = {}
for r in recs:
    base.setdefault((r["c"], r["tokens"]), []).append(r["ttft"])
med = {k: st.median(v) for k, v in base.items()}
hit, miss = [], []
for r in recs:
    a, b = r["sent"], r["sent"] + r["ttft"]
    g = sum(x[1] for rows in gcs.values() for x in rows if a - x[1] / 1e3 <= x[0] <= b)
    (hit if g > 0 else miss).append((r["ttft"] - med[(r["c"], r["tokens"])]) * 1e3)
    r["gc_ms"] = g
print(f"requests with a gc during their TTFT: {len(hit)}, excess over median {st.mean(hit) if hit else 0:.2f} ms mean; "
      f"without: {len(miss)}, {st.mean(miss):.2f} ms mean")
slow = sorted(recs, key=lambda r: (r['ttft'] - med[(r['c'], r['tokens'])]), reverse=True)[:15]
for r in slow:
    print(f"  slow: c{r['c']} {r['tokens']:4d} tok ttft {r['ttft']*1e3:6.1f} (median {med[(r['c'], r['tokens'])]*1e3:5.1f}) gc during: {r['gc_ms']:.1f} ms")
for c in (1, 2, 4):
    print(f"c{c} medians: " + " ".join(f"{n}:{med[(c,n)]*1e3:.1f}" for n in (768, 384, 128, 32)))
