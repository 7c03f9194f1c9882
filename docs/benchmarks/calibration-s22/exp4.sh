#!/bin/bash
# exp4: the experiment file copied into the worktree's tests/fidelity for the run only
cd /work/wt/calib22 || exit 1
cp /work/exp/calib22/exp4_test.py tests/fidelity/test_zz_calib22_exp.py
T0=$(date -u +%H:%M:%S)
EXP_OUT=/work/exp/calib22/exp4.json EXP_ROUNDS=20 env PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv /work/main/.venv/bin/python -m pytest -m fidelity tests/fidelity/test_zz_calib22_exp.py -q -rs -s > /work/exp/calib22/exp4.log 2>&1
rc=$?
rm -f tests/fidelity/test_zz_calib22_exp.py
echo "start $T0 end $(date -u +%H:%M:%S) rc $rc" >> /work/exp/calib22/exp4.log
exit $rc
