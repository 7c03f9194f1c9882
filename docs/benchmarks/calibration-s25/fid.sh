#!/bin/bash
# fid.sh COPYDIR TAG: one fidelity run through the queue; report + samples copied out
WT=$1; TAG=$2
DEST=/work/wt/calib25/docs/benchmarks/calibration-s25/$TAG
mkdir -p $DEST
cd $WT
rm -f out/fidelity/report.json out/fidelity/calibration-samples.json
HEAVY_WHO=calib25 /work/bin/heavy bash -c "echo START \$(date -u +%FT%TZ) tree $(cat $WT/.tree 2>/dev/null || git -C $WT rev-parse --short HEAD); env PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv HF_HUB_OFFLINE=1 HF_ENDPOINT=http://127.0.0.1:9 /work/main/.venv/bin/python -m pytest -m fidelity tests/fidelity/test_calibration.py -q -rs -p no:cacheprovider; rc=\$?; echo END \$(date -u +%FT%TZ) rc=\$rc" > $DEST/run.log 2>&1
cp out/fidelity/report.json $DEST/report.json
cp out/fidelity/calibration-samples.json $DEST/samples.json
