#!/bin/bash
# usage: diag.sh NAME ROUNDS REV -- tokens.py (as in the worktree now) from a snapshot of REV
name=$1; rev=$3
snap=/tmp/calib/snap-$name
rm -rf $snap; mkdir -p $snap
cd /work/wt/calib && git archive $rev | tar -x -C $snap
mkdir -p $snap/docs/benchmarks/calibration-s19 && cp docs/benchmarks/calibration-s19/tokens.py $snap/docs/benchmarks/calibration-s19/
for l in .venv .fidelity-venv .bench-venvs; do ln -s /work/main/$l $snap/$l; done
cd $snap
touch /work/QUIET
date -u > /tmp/calib/$name.meta
env PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv timeout 900 /work/main/.venv/bin/python docs/benchmarks/calibration-s19/tokens.py $2 /tmp/calib/$name.json > /tmp/calib/$name.log 2>&1
rc=$?
rm -f /work/QUIET
echo "end $(date -u) rc=$rc" >> /tmp/calib/$name.meta
exit $rc
