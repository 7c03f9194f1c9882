#!/bin/bash
# fid.sh WORKTREE TAG: one fidelity run through the queue, report + samples copied out
WT=$1; TAG=$2
DEST=/work/wt/calib23/docs/benchmarks/calibration-s23
mkdir -p $DEST
cd $WT
rm -f out/fidelity/report.json out/fidelity/calibration-samples.json
HEAVY_WHO=calib23 /work/bin/heavy bash -c "echo START \$(date -u +%FT%TZ) $(git -C $WT rev-parse --short HEAD); env PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv ./.venv/bin/python -m pytest -m fidelity tests/fidelity/test_calibration.py -q -rs; rc=\$?; echo END \$(date -u +%FT%TZ) rc=\$rc" > $DEST/$TAG.log 2>&1
cp out/fidelity/report.json $DEST/$TAG-report.json
cp out/fidelity/calibration-samples.json $DEST/$TAG-samples.json
