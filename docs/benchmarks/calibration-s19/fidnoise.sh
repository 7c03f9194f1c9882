#!/bin/bash
# usage: fidnoise.sh RUNNAME REV SEED -- fid.sh with noise.py on CPU 0 until the emulator starts
set -u
name=$1; rev=$2; seed=$3
snap=/tmp/calib/snap-$name
rm -rf $snap; mkdir -p $snap
cd /work/wt/calib && git archive $rev | tar -x -C $snap
cp /work/wt/calib/docs/benchmarks/calibration-s19/noise.py /tmp/calib/noise.py
for l in .venv .fidelity-venv .bench-venvs; do ln -s /work/main/$l $snap/$l; done
[ -d /work/main/src/inferplane/_native ] && cp -r /work/main/src/inferplane/_native $snap/src/inferplane/
cd $snap
PYTHONPATH=src:. /work/main/.venv/bin/python scripts/compile_native.py > /tmp/calib/$name.compile.log 2>&1
touch /work/QUIET
echo "rev $(cd /work/wt/calib && git rev-parse $rev) noise seed $seed start $(date -u)" > /tmp/calib/$name.meta
env PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv /work/main/.venv/bin/python -m pytest -p no:cacheprovider -m fidelity tests/fidelity/test_calibration.py -q -rs > /tmp/calib/$name.log 2>&1 &
tpid=$!
# the noise starts with the test (vLLM's start-up included) and stops when the emulator starts
taskset -c 0 /work/main/.venv/bin/python /tmp/calib/noise.py $seed &
npid=$!
while kill -0 $tpid 2>/dev/null; do
  if pgrep -f "inferplane.cli emulate --config .*fleet-cpu-fidelity.yaml" > /dev/null; then
    echo "noise stopped $(date -u)" >> /tmp/calib/$name.meta; break
  fi
  sleep 0.2
done
kill $npid 2>/dev/null
wait $tpid
rc=$?
rm -f /work/QUIET
echo "end $(date -u) rc=$rc" >> /tmp/calib/$name.meta
mkdir -p /tmp/calib/$name.out && cp -r out/fidelity/. /tmp/calib/$name.out/
exit $rc
