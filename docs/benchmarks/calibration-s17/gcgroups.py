import json, sys, statistics as st
R = json.load(open(sys.argv[1] + "/recs.json")); recs = R["recs"]
c = int(sys.argv[2]) if len(sys.argv) > 2 else 4
rows = []
for r in sorted({x["round"] for x in recs}):
    xs = sorted([x for x in recs if x["round"] == r and x["c"] == c], key=lambda x: x["sent"])
    for g in range(0, len(xs), c):
        grp = xs[g:g + c]
        t0 = grp[0]["sent"]
        rows.append((r, g // c, [(x["tokens"], round((x["sent"] - t0) * 1e3, 1), round(x["ttft"] * 1e3, 1),
                                  round((x["sent"] - t0 + x["ttft"]) * 1e3, 1)) for x in grp]))
for r, g, grp in rows:
    print(r, g, "  ".join(f"{n}@{d}:{t}->{a}" for n, d, t, a in grp))
