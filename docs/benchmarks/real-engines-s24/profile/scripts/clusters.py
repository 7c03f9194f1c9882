"""prof24: pre-send samples (C/A/P/S of timeline.py) of the loop thread grouped into bursts
(gaps > 0.5 s), each matched to the replay's burst (every 3 s) by its time modulo 3 s.

    python clusters.py PROFILE.speedscope.json RESULTS.json SETUP
"""
import collections
import json
import sys

sys.argv, argv = sys.argv[:2], sys.argv
exec(open(__file__.rsplit("/", 1)[0] + "/timeline.py").read().split("# bursts:")[0])
res = json.load(open(argv[2]))
r = next(x for x in res["results"] if x["name"] == argv[3])
sizes = collections.Counter(round(x[1]) for x in r["per_request"])
idx = [i for i, ch in enumerate(line) if ch in "CAPS"]
groups = []
for i in idx:
    if groups and (i - groups[-1][-1]) * dt < 0.5:
        groups[-1].append(i)
    else:
        groups.append([i])
print(f"{len(groups)} groups of pre-send samples")
for g in groups:
    t0 = g[0] * dt
    span = (g[-1] - g[0] + 1) * dt * 1000
    print(f"t={t0:7.3f} (mod 3 s: {t0 % 3:5.3f})  span {span:5.0f} ms  pre-send samples {len(g):2d} "
          f"|{line[g[0] - 1:g[-1] + 2]}|")
