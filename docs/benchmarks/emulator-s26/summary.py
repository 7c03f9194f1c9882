"""Summarise emu_only/*.json: per tree and run, c1 TTFT per size against the profile's
prediction (ms and signed difference), the c2/c4 level medians and c4 per size."""
from __future__ import annotations

import json
import sys
from pathlib import Path

here = Path(__file__).resolve().parent / (sys.argv[1] if len(sys.argv) > 1 else "emu_only")
rows = sorted(here.glob("*.json"), key=lambda p: p.stem.split("-")[-1])
print(f"{'run':<14} {'c1 32':>13} {'c1 128':>13} {'c1 384':>13} {'c1 768':>14} | "
      f"{'c1':>5} {'c2':>5} {'c4':>5} | c4 32/128/384/768")
for p in rows:
    r = json.loads(p.read_text())
    pred, c1 = r["predicted_c1_ms"], r["per_size_ms"]["c1"]
    cells = [f"{c1[n]:5.1f} ({c1[n] - pred[n]:+5.2f})" for n in ("32", "128", "384", "768")]
    lv = r["per_level_ms"]
    c4 = r["per_size_ms"]["c4"]
    print(f"{p.stem:<14} {' '.join(cells)} | {lv['c1'][0]:5.1f} {lv['c2'][0]:5.1f} "
          f"{lv['c4'][0]:5.1f} | " + "/".join(f"{c4[n]:.1f}" for n in ("32", "128", "384", "768")))
print("predicted c1:", rows and json.loads(rows[0].read_text())["predicted_c1_ms"])
