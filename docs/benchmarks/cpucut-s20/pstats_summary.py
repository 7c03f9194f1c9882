import pstats, sys
p = pstats.Stats(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 300
st = p.stats  # (file,line,func) -> (cc, nc, tt, ct, callers)
tot = sum(v[2] for v in st.values())
print(f"total tottime {tot:.3f} s; per request {1e3*tot/n:.3f} ms")
def short(k): 
    f, l, fn = k
    f = f.split('site-packages/')[-1].split('/src/')[-1]
    return f"{f}:{l}({fn})"
rows = sorted(st.items(), key=lambda kv: -kv[1][2])
print("--- top tottime (all)")
for k, v in rows[:45]:
    print(f"{1e6*v[2]/n:8.1f} us/req {v[1]:7d} calls  {short(k)}")
print("--- top tottime inferplane")
ip = [(k, v) for k, v in rows if 'inferplane/' in k[0]]
print(f"inferplane own tottime per request: {1e6*sum(v[2] for _, v in ip)/n:.1f} us")
for k, v in ip[:60]:
    print(f"{1e6*v[2]/n:8.1f} us/req {v[1]:7d} calls  {short(k)}")
print("--- cumulative inferplane")
for k, v in sorted(ip, key=lambda kv: -kv[1][3])[:60]:
    print(f"{1e6*v[3]/n:8.1f} us/req cum {v[1]:7d} calls  {short(k)}")
