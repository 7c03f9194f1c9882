#!/bin/bash
# emu26-demo.sh: `inferplane demo` CPU, main and branch alternating, 3 runs each, one queue slot
OUT=/work/wt/emu26/docs/benchmarks/emulator-s26/demo_cpu.txt
for i in 1 2 3; do for T in fmain fnew; do
  cd /tmp/emu26-$T
  echo "$(date -u +%FT%TZ) $T run $i $(git rev-parse --short HEAD)" >> $OUT
  env PYTHONPATH=src:. HF_HUB_OFFLINE=1 HF_ENDPOINT=http://127.0.0.1:9 /usr/bin/time -f "CPU user %U sys %S wall %e" /work/main/.venv/bin/python -m inferplane.cli demo > /tmp/emu26-demo-$T-$i.log 2>&1
  tail -1 /tmp/emu26-demo-$T-$i.log >> $OUT
done; done
