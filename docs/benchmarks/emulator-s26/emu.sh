#!/bin/bash
# emu26-emu.sh ROUNDS TAG...: emulator-only bench, the trees in turn, one queue slot
R=$1; shift
OUT=/work/wt/emu26/docs/benchmarks/emulator-s26/emu_only
mkdir -p $OUT
for T in "$@"; do
  cd /tmp/emu26-$T
  echo "$(date -u +%FT%TZ) $T start"
  env PYTHONPATH=src:. HF_HUB_OFFLINE=1 HF_ENDPOINT=http://127.0.0.1:9 /work/main/.venv/bin/python docs/benchmarks/emulator-s26/emu_only.py $OUT/$T-$(date -u +%H%M%S).json $R
done
