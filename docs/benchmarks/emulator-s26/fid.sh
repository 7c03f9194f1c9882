#!/bin/bash
# emu26-fid.sh TAG...: one fidelity run per tag (fmain|fnew), through the queue each; report + samples copied out
for TAG in "$@"; do
WT=/tmp/emu26-$TAG
N=$(date -u +%H%M%S)
DEST=/work/wt/emu26/docs/benchmarks/emulator-s26/fidelity/$TAG-$N
mkdir -p $DEST
cd $WT
rm -f out/fidelity/report.json out/fidelity/calibration-samples.json
HEAVY_WHO=emu26 /work/bin/heavy bash -c "echo START \$(date -u +%FT%TZ) tree $TAG $(git -C $WT rev-parse --short HEAD); env PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv HF_HUB_OFFLINE=1 HF_ENDPOINT=http://127.0.0.1:9 /work/main/.venv/bin/python -m pytest -m fidelity tests/fidelity/test_calibration.py -q -rs -p no:cacheprovider; rc=\$?; echo END \$(date -u +%FT%TZ) rc=\$rc" > $DEST/run.log 2>&1
cp out/fidelity/report.json $DEST/report.json
cp out/fidelity/calibration-samples.json $DEST/samples.json
done
