#!/bin/bash
# usage: fid.sh WORKTREE TAG
cd "$1" || exit 1
T0=$(date -u +%H:%M:%S)
env PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv /work/main/.venv/bin/python -m pytest -m fidelity tests/fidelity/test_calibration.py -q -rs > /work/exp/calib22/$2.log 2>&1
rc=$?
echo "start $T0 end $(date -u +%H:%M:%S) rc $rc" >> /work/exp/calib22/$2.log
cp out/fidelity/report.json /work/exp/calib22/$2-report.json; cp out/fidelity/calibration-samples.json /work/exp/calib22/$2-samples.json
exit $rc
