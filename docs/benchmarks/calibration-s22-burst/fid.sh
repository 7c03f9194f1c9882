#!/bin/bash
# usage: fid.sh WORKTREE TAG  (one fidelity calibration run; report + log to /work/exp/burst22)
cd "$1" || exit 1
T0=$(date -u +%H:%M:%S)
env PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv /work/main/.venv/bin/python -m pytest -m fidelity tests/fidelity/test_calibration.py -q -rs > /work/exp/burst22/$2.log 2>&1
rc=$?
T1=$(date -u +%H:%M:%S)
echo "start $T0 end $T1 rc $rc git $(git rev-parse --short HEAD)" >> /work/exp/burst22/$2.log
cp out/fidelity/report.json /work/exp/burst22/$2-report.json
exit $rc
