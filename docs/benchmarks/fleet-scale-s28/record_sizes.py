"""Decision-record sizes in a SQLite ledger (docs/evidence.md, "Record size").

    python record_sizes.py LEDGER.sqlite3 [...]

For each file: records, candidates a record, stored text bytes a record (the `record` column,
the canonical JSON) with its `candidates[]` share, and bytes a candidate; min / median / max.
"""

import json
import sqlite3
import statistics
import sys


def spread(xs: list[float]) -> str:
    return f"{min(xs):,.0f} / {statistics.median(xs):,.0f} / {max(xs):,.0f}"


for path in sys.argv[1:]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    sizes, cands, cand_bytes, per = [], [], [], []
    for (text,) in db.execute("SELECT record FROM decisions"):
        rec = json.loads(text)
        cs = rec.get("candidates") or []
        b = [len(json.dumps(c, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
                 .encode()) for c in cs]
        sizes.append(len(text.encode()))
        cands.append(len(cs))
        cand_bytes.append(sum(b) + max(len(b) - 1, 0))  # with the commas between them
        per += b
    print(f"{path}: {len(sizes)} records")
    print(f"  candidates a record (min/median/max): {spread(cands)}")
    print(f"  bytes a record: {spread(sizes)}")
    print(f"  candidates[] bytes a record: {spread(cand_bytes)}")
    if per:
        print(f"  bytes a candidate: {spread(per)}")
