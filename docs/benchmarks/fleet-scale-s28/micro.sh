#!/bin/bash
# micro.py on main (the merge base, with its mypyc build) and on the branch (the same build, its
# sources over it), 2,000 endpoints; through /work/bin/heavy. Output: micro-main.txt,
# micro-branch.txt. $W/main: bench run.sh's main tree (main 53b8242 with scripts/compile_native.py
# built); $W/branch: a copy of it with this branch's src/ and bench/ synced over (no .so changed).
set -e
export HF_HUB_OFFLINE=1 HF_ENDPOINT=http://127.0.0.1:9 LITELLM_LOCAL_MODEL_COST_MAP=True
P=/work/main/.venv/bin/python
W=${W:-/tmp/s28b}
OUT=$(cd "$(dirname "$0")" && pwd)
cd "$W/branch" && PYTHONPATH=src:. $P -c "
from pathlib import Path
from bench.fleet_scale import fleet_yaml
Path('$W/fleet2000.yaml').write_text(fleet_yaml(2000, 9, 18999, Path('$W/micro.sqlite3')))"
for tree in main branch; do
  (cd "$W/$tree" && echo "# $tree tree, $(date -u '+%F %T') UTC, $(uptime)" \
    && PYTHONPATH=src:. $P "$OUT/micro.py" "$W/fleet2000.yaml") > "$OUT/micro-$tree.txt" 2>&1
done
