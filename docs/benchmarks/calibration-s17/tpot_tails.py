# session 17: per run, TPOT P50/P90 (median over rounds) and per concurrency level, real and emulator (run from the repository root)
import json,glob,statistics as st,sys
def pct(xs,q): return st.quantiles(xs,n=100,method="inclusive")[q-1]
files=sorted(glob.glob('docs/benchmarks/calibration-s1[567]/*-samples.json'))+sys.argv[1:]
for f in files:
    s=json.load(open(f))
    name=f.split('/')[-1][:-13]
    print("==",name)
    for who in s:
        rs=s[who]
        p90=[pct(r['tpot'],90) for r in rs]; p50=[pct(r['tpot'],50) for r in rs]
        lev={c:[st.median([t for t,l in zip(r['tpot'],r['tpot_level']) if l==c]) for r in rs] for c in (1,2,4)}
        lev90={c:[pct([t for t,l in zip(r['tpot'],r['tpot_level']) if l==c],90) for r in rs] for c in (1,2,4)}
        print(f"{who:12s} P50 {st.median(p50):.3f} P90 {st.median(p90):.3f} | per-level med "+" ".join(f"c{c} {st.median(v):.3f}" for c,v in lev.items())+" | per-level p90 "+" ".join(f"c{c} {st.median(v):.3f}" for c,v in lev90.items()))
