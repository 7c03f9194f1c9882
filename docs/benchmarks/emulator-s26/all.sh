#!/bin/bash
# emu26-all.sh: the remaining fidelity runs (alternating) and the demo CPU runs, in one queue slot
fid() {
  TAG=$1; WT=/tmp/emu26-$TAG
  DEST=/work/wt/emu26/docs/benchmarks/emulator-s26/fidelity/$TAG-$(date -u +%H%M%S)
  mkdir -p $DEST; cd $WT
  rm -f out/fidelity/report.json out/fidelity/calibration-samples.json
  { echo START $(date -u +%FT%TZ) tree $TAG $(git rev-parse --short HEAD)
    env PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv HF_HUB_OFFLINE=1 HF_ENDPOINT=http://127.0.0.1:9 /work/main/.venv/bin/python -m pytest -m fidelity tests/fidelity/test_calibration.py -q -rs -p no:cacheprovider
    echo END $(date -u +%FT%TZ) rc=$?; } > $DEST/run.log 2>&1
  cp out/fidelity/report.json $DEST/report.json; cp out/fidelity/calibration-samples.json $DEST/samples.json
}
fid fnew; fid fmain; fid fnew
/tmp/emu26-demo.sh
fid fmain; fid fnew
