#!/bin/bash
# usage: fid.sh RUNNAME REV [SEED] -- the fidelity calibration test from a git-archive snapshot
# of REV (session 20, engineer calib20); with SEED, session 19's synthetic neighbour
# (calibration-s19/noise.py) runs as a real-time task (chrt -f 10) on CPU 0 -- the real vLLM's
# engine core -- from the test's start until the emulator's process starts, as in
# calibration-s19/fidnoise3.sh. Run through the CPU queue: HEAVY_WHO=calib20 /work/bin/heavy.
set -u
name=$1; rev=$2; seed=${3:-}
wt=/work/wt/calib20
snap=/tmp/calib20/snap-$name
rm -rf $snap; mkdir -p $snap
cd $wt && git archive $rev | tar -x -C $snap
for l in .venv .fidelity-venv .bench-venvs; do ln -s /work/main/$l $snap/$l; done
[ -d /work/main/src/inferplane/_native ] && cp -r /work/main/src/inferplane/_native $snap/src/inferplane/
cd $snap
PYTHONPATH=src:. /work/main/.venv/bin/python scripts/compile_native.py > /tmp/calib20/$name.compile.log 2>&1
touch /work/QUIET
echo "rev $(cd $wt && git rev-parse $rev) noise ${seed:-none} start $(date -u)" > /tmp/calib20/$name.meta
env PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv /work/main/.venv/bin/python -m pytest -p no:cacheprovider -m fidelity tests/fidelity/test_calibration.py -q -rs > /tmp/calib20/$name.log 2>&1 &
tpid=$!
if [ -n "$seed" ]; then
  chrt -f 10 taskset -c 0 /work/main/.venv/bin/python $wt/docs/benchmarks/calibration-s19/noise.py $seed &
  npid=$!
  while kill -0 $tpid 2>/dev/null; do
    if pgrep -f "inferplane.cli emulate --config .*fleet-cpu-fidelity.yaml" > /dev/null; then
      echo "noise stopped $(date -u)" >> /tmp/calib20/$name.meta; break
    fi
    sleep 0.2
  done
  kill $npid 2>/dev/null
fi
wait $tpid
rc=$?
rm -f /work/QUIET
echo "end $(date -u) rc=$rc" >> /tmp/calib20/$name.meta
mkdir -p /tmp/calib20/$name.out && cp -r out/fidelity/. /tmp/calib20/$name.out/
exit $rc
