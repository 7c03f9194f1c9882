#!/bin/bash
# usage: pair.sh FIRST SECOND N  (FIRST/SECOND: main|new) two alternating fidelity runs
if [ ! -f /work/exp/burst22/main-compiled ]; then
  (cd /work/wt/burst22-main && /work/main/.venv/bin/python scripts/compile_native.py > /work/exp/burst22/compile-main.log 2>&1) && touch /work/exp/burst22/main-compiled
fi
for w in $1 $2; do
  if [ $w = main ]; then /work/exp/burst22/fid.sh /work/wt/burst22-main main$3; else /work/exp/burst22/fid.sh /work/wt/burst22 new$3; fi
done
