#!/bin/bash
# usage: exp.sh WORKTREE TAG
cd "$1" || exit 1
T0=$(date -u +%H:%M:%S)
EXP_OUT=/work/exp/calib22/$2.json env PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv /work/main/.venv/bin/python -m pytest -m fidelity tests/fidelity/test_zz_calib22_exp.py -q -rs -s > /work/exp/calib22/$2.log 2>&1
rc=$?
echo "start $T0 end $(date -u +%H:%M:%S) rc $rc" >> /work/exp/calib22/$2.log
exit $rc
