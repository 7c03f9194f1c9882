"""by_position.py DIR...: per fidelity run (DIR holding samples.json), each concurrency level's
requests in completion order (the order ``run_workload`` records them): prompt tokens, then
the real engine's and the emulator's TTFT (ms), each the median over rounds."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(dirs: list[str]) -> None:
    for d in dirs:
        s = json.loads((Path(d) / "samples.json").read_text())
        print(d)
        for level in (1, 2, 4):
            cells = []
            for i in range(12):
                vals = {}
                for name in ("real", "calibrated"):
                    rows = [[(p, t) for t, lv, p in zip(r["ttft"], r["ttft_level"],
                                                        r["ttft_prompt"], strict=True)
                             if lv == level] for r in s[name]]
                    vals[name] = statistics.median(row[i][1] for row in rows if i < len(row))
                    size = rows[0][i][0]
                cells.append(f"{size}:{vals['real']:.1f}/{vals['calibrated']:.1f}")
            print(f" c{level} " + " ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1:])
