#!/bin/bash
# calib29b, in the queue: unit checks, revert checks, tables, emulator-alone runs
export PYTHONPATH=src:. HF_HUB_OFFLINE=1 HF_ENDPOINT=http://127.0.0.1:9
PY=/work/main/.venv/bin/python; PT=/work/main/.venv/bin/pytest
B=/tmp/calib29b/br; M=/tmp/calib29b/main; R=/tmp/calib29b/rv; O=/tmp/calib29b/out
rm -rf $B $M $R $O; mkdir -p $O
rsync -a --exclude .venv --exclude .fidelity-venv --exclude .bench-venvs --exclude .git /work/wt/calib29/ $B/
mkdir -p $M && git -C /work/wt/calib29 archive 0da9caa | tar -x -C $M
cp $B/docs/benchmarks/calibration-s29/{closed_loop.py,emu_alone.py} $M/  # scripts only
date -u +"== %H:%M:%S native"
(cd $B && $PY scripts/compile_native.py --strict 2>&1 | tail -1)
(cd $M && $PY scripts/compile_native.py --strict 2>&1 | tail -1)
T="tests/test_calibration.py"
NEW="-k no_step_before_the_previous or lone_requests_time_as_before or round_trip_out_after"
cd $B
date -u +"== %H:%M:%S branch: new tests"; $PT -q -p no:cacheprovider $T $NEW 2>&1 | tail -2
date -u +"== %H:%M:%S branch: $T"; $PT -q -p no:cacheprovider $T 2>&1 | tail -2
date -u +"== %H:%M:%S branch: emulator tests"; $PT -q -p no:cacheprovider tests -k emulat 2>&1 | tail -2
echo "== ruff"; /work/main/.venv/bin/ruff check src tests bench 2>&1 | tail -1
echo "== mypy"; /work/main/.venv/bin/mypy 2>&1 | tail -1
cp -a $B $R; cd $R
git -C /work/wt/calib29 show 072b36a:src/inferplane/twin/emulator/endpoint.py > src/inferplane/twin/emulator/endpoint.py
echo "== before the fix (072b36a endpoint.py): S1 test must fail, S3 test passes (pins)"
$PT -q -p no:cacheprovider $T -k "no_step_before_the_previous or lone_requests_time_as_before" 2>&1 | tail -3
git -C /work/wt/calib29 show 0da9caa:src/inferplane/twin/emulator/endpoint.py > src/inferplane/twin/emulator/endpoint.py
echo "== main's endpoint.py: S3 test passes (the claim: unchanged)"; $PT -q -p no:cacheprovider $T -k lone_requests_time_as_before 2>&1 | tail -1
cp $B/src/inferplane/twin/emulator/endpoint.py src/inferplane/twin/emulator/endpoint.py
sed -i 's/                reached = fe.handoff(reached) - cut/                reached = fe.handoff(reached)/' src/inferplane/twin/emulator/endpoint.py
echo "== mutant (no - cut after the hand-off): S3 test must fail"; $PT -q -p no:cacheprovider $T -k lone_requests_time_as_before 2>&1 | tail -1
cd $B
date -u +"== %H:%M:%S tables"
$PY docs/benchmarks/calibration-s29/runs_table.py docs/benchmarks/calibration-s29/fidelity > $O/runs_table.txt
$PY docs/benchmarks/calibration-s29/runs_table.py docs/benchmarks/calibration-s28/fidelity > $O/s28_runs_table.txt
for a in "--rtt 0" "--rtt 1 --mode after" "--rtt 1 --mode cut"; do
  $PY docs/benchmarks/calibration-s29/closed_loop.py docs/benchmarks/calibration-s28/fidelity/br3-204424/report.json $a
done > $O/closed_loop_br3.txt
for rep in br3-204424 main28-204305; do
  for tree in $B $M; do
    cd $tree; date -u +"== %H:%M:%S emu_alone $rep $tree"
    if [ $tree = $M ]; then S=emu_alone.py; else S=docs/benchmarks/calibration-s29/emu_alone.py; fi
    timeout 150 $PY $S $B/docs/benchmarks/calibration-s28/fidelity/$rep/report.json 5 2>&1 | tail -5
  done
done > $O/emu_alone.txt 2>&1
date -u +"== %H:%M:%S done"
