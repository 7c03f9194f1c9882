# session 17: per run, c4 groups (idle burst, closed loop): first request and the rest, real and emulator; c2 pairs (run from the repository root)
import json,glob,statistics as st,sys
files=sorted(glob.glob('docs/benchmarks/calibration-s1[567]/*-samples.json'))
med=st.median
print("run | who | c1-768 | g1 first/rest | g2-3 first/rest | g2-3 first-over-lone768 | c2 pair2 (128/32) | c2 pair1")
for f in files:
    s=json.load(open(f)); name=f.split('/')[-1][:-13]
    for who in s:
        c1=[];g1f=[];g1r=[];gf=[];gr=[];p2=[];p1=[]
        for r in s[who]:
            t1=[t for t,l in zip(r['ttft'],r['ttft_level']) if l==1]
            c1+= [t1[0],t1[4],t1[8]]
            t4=[t for t,l in zip(r['ttft'],r['ttft_level']) if l==4]
            for g in range(3):
                grp=t4[4*g:4*g+4]
                (g1f if g==0 else gf).append(grp[0]); (g1r if g==0 else gr).extend(grp[1:])
            t2=[t for t,l in zip(r['ttft'],r['ttft_level']) if l==2]
            for g in range(3):
                p1.extend(t2[4*g:4*g+2]); p2.extend(t2[4*g+2:4*g+4])
        l=med(c1)
        print(f"{name:14s} {who[:4]} {l:5.1f} | {med(g1f):5.1f} {med(g1r):5.1f} | {med(gf):5.1f} {med(gr):5.1f} | {med(gf)-l:+5.1f} | {med(p2):5.1f} | {med(p1):5.1f}")
