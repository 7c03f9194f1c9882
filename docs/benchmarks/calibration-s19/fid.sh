#!/bin/bash
# usage: fid.sh RUNNAME REV  -- the fidelity calibration test from a git-archive snapshot of REV
set -u
name=$1; rev=$2
snap=/tmp/calib/snap-$name
rm -rf $snap; mkdir -p $snap
cd /work/wt/calib && git archive $rev | tar -x -C $snap
for l in .venv .fidelity-venv .bench-venvs; do ln -s /work/main/$l $snap/$l; done
[ -d /work/main/src/inferplane/_native ] && cp -r /work/main/src/inferplane/_native $snap/src/inferplane/
cd $snap
PYTHONPATH=src:. /work/main/.venv/bin/python scripts/compile_native.py > /tmp/calib/$name.compile.log 2>&1
touch /work/QUIET
echo "rev $(cd /work/wt/calib && git rev-parse $rev) start $(date -u)" > /tmp/calib/$name.meta
env PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv /work/main/.venv/bin/python -m pytest -p no:cacheprovider -m fidelity tests/fidelity/test_calibration.py -q -rs > /tmp/calib/$name.log 2>&1
rc=$?
rm -f /work/QUIET
echo "end $(date -u) rc=$rc" >> /tmp/calib/$name.meta
mkdir -p /tmp/calib/$name.out && cp -r out/fidelity/. /tmp/calib/$name.out/
exit $rc
