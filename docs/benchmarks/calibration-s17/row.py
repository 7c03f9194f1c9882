# session 17: one markdown row per fidelity report given (gaps, per-level TTFT, the idle burst of c4)
import json, sys, statistics as st
def g1(s, who):
    f=[];r=[]
    for x in s[who]:
        t4=[t for t,l in zip(x['ttft'],x['ttft_level']) if l==4]
        f.append(t4[0]); r.extend(t4[1:4])
    return st.median(f), st.median(r)
for f in sys.argv[1:]:
    d=json.load(open(f)); s=json.load(open(f.replace('-report.json','-samples.json')))
    g=d['calibration_workload_gaps']; pe=d['calibration_prediction_error']['median']
    lv=d['calibration_workload_per_level_ms']; lr, le = lv['real'], lv['calibrated']
    name=f.split('/')[-1].replace('-report.json','')
    ok = pe<=0.2 and all(abs(v)<=0.15 for v in g.values())
    other=d['calibration_other_cpu']
    res = 'skipped (other CPU)' if other and other>0.25 else ('**passed**' if ok else 'skipped (targets)')
    gr, ge = g1(s,'real'), g1(s,'calibrated')
    print(f"| {name} | {other:.2f} | {pe*100:.1f} % | {g['ttft_p50']*100:+.1f} / {g['ttft_p90']*100:+.1f} % | {g['tpot_p50']*100:+.1f} / {g['tpot_p90']*100:+.1f} % | "
          f"{le['c1'][0]} / {lr['c1'][0]}, {le['c2'][0]} / {lr['c2'][0]}, {le['c4'][0]} / {lr['c4'][0]} | {ge[0]:.1f}+{ge[1]:.1f} / {gr[0]:.1f}+{gr[1]:.1f} | {res} |")
