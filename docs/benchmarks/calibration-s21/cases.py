"""Per held-out case, the signed error of every stored fidelity report (sessions 15-20)."""
import glob, json, sys
rows = []
files = sorted(glob.glob(sys.argv[1] + "/calibration-s1[5679]/*report.json")) + sorted(
    glob.glob(sys.argv[1] + "/calibration-s20/*report.json"))
print("run | median | 96 | 320 | 640 | rank 0 | rank 1 | rank 2 | r0 - lone 320 ms | r2 - r1 ms")
for f in files:
    d = json.load(open(f)); pe = d["calibration_prediction_error"]; ho = d["calibration_held_out_ms"]
    t = [*ho["alone"].values(), *ho["burst"]]
    s = [(p - q) / q for p, q in zip(pe["predicted_ms"], t)]
    rows.append((s, t[3] - t[1], t[5] - t[4]))
    print(f.split("/")[-2], f.split("/")[-1][:-12], "| %.3f |" % pe["median"],
          " | ".join("%+.3f" % x for x in s), "| %.1f | %.1f" % (t[3] - t[1], t[5] - t[4]))
for i, name in enumerate(("96", "320", "640", "rank 0", "rank 1", "rank 2")):
    xs = [r[0][i] for r in rows]
    print(f"{name}: min {min(xs):+.3f} max {max(xs):+.3f}, under in {sum(x < 0 for x in xs)} of {len(xs)}")
a = [r[1] for r in rows]; b = [r[2] for r in rows]
print(f"rank 0 over lone 320: {min(a):.1f}-{max(a):.1f} ms; rank 2 - rank 1: {min(b):.1f}-{max(b):.1f} ms, <= 1.6 ms in {sum(x <= 1.6 for x in b)} of {len(b)}")
