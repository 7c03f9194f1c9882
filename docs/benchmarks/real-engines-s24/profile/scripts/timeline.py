"""prof24: the gateway's loop thread, sample by sample (py-spy --idle speedscope, 250 Hz), as a
strip of letters per 4-ms sample; bursts found as runs of handler samples after >= 300 ms with
none.

    python timeline.py PROFILE.speedscope.json [N_BURSTS]
"""
import json
import re
import sys

d = json.load(open(sys.argv[1]))
nb = int(sys.argv[2]) if len(sys.argv) > 2 else 12
frames = d["shared"]["frames"]
names = [f"{f.get('file') or ''}:{f['name']}" for f in frames]
prof = next(p for p in d["profiles"] if "MainThread" in p["name"])
dt = prof["endValue"] / len(prof["samples"])
CODES = [
    ("C", r"_tokenize|Core\.classify"),
    ("A", r"admit"),
    ("P", r"Core\.hold|Core\.reserve|Core\.decide"),
    ("S", r"Dispatcher\.open|eager_writer|pipeline\.py:send$"),
    ("1", r"first_chunk"),
    ("F", r"app\.py:forward.*(account|committed)"),
    ("W", r"app\.py:forward"),
    ("H", r"app\.py:(handle|handler)$"),
    ("s", r"Scraper\._scrape|HttpMetricsSource\.metrics|engine_metrics"),
    ("h", r"health|probe"),
    ("k", r"KVEventSub|kv_events"),
    ("b", r"Batch"),
    ("w", r"aiohttp/web"),
    ("c", r"aiohttp/(client|streams)"),
]
CODES = [(c, re.compile(r)) for c, r in CODES]
strip = []
for s in prof["samples"]:
    if not s:
        strip.append(" ")
        continue
    leaf = names[s[-1]]
    if re.search(r"cli\.py:_serve_one$|runners\.py|base_events|MainThread", leaf) and len(s) < 20:
        strip.append(".")  # the loop's own C code, or idle: py-spy --idle cannot tell them apart
        continue
    joined = ";".join(names[i] for i in s)
    code = "o"
    for c, r in CODES:
        if r.search(joined):
            code = c
            break
    strip.append(code)
line = "".join(strip)
print(f"{len(line)} samples, {dt * 1000:.1f} ms each; counts:",
      {c: line.count(c) for c in "CAPS1FWHshkbwco."})
# bursts: a 'C' after >= 300 ms without C/A/P/S
bursts = []
last = -10**9
for i, ch in enumerate(line):
    if ch == "C":
        if i - last > 0.3 / dt:
            bursts.append(i)
        last = i
print(f"{len(bursts)} bursts")
stats = []
for b in bursts:
    seg = line[b:b + int(0.25 / dt)]
    last_s = max((j for j, ch in enumerate(seg[:int(0.08 / dt)]) if ch in "CAPS"), default=0)
    first_s = seg.find("S")
    first_w = seg.find("W")
    stats.append((first_s, last_s, first_w, seg[:last_s + 1].count("C"), seg[:last_s + 1].count(".")))
for b in bursts[:nb]:
    print(f"t={b * dt:7.2f} s |{line[b - 3:b + int(0.2 / dt)]}|")
import statistics as st

fs = [x[0] for x in stats if x[0] >= 0]
ls = [x[1] for x in stats]
fw = [x[2] for x in stats if x[2] >= 0]
print(f"samples from a burst's first classify sample to its first send sample: median {st.median(fs)} "
      f"({st.median(fs) * dt * 1000:.0f} ms); to its last pre-send sample (C/A/P/S within 80 ms): "
      f"median {st.median(ls)} ({st.median(ls) * dt * 1000:.0f} ms), max {max(ls)}; to the first relay "
      f"write: median {st.median(fw)} ({st.median(fw) * dt * 1000:.0f} ms)")
