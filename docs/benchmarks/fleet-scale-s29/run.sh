#!/bin/bash
# scale29b's queue slot (/tmp/s29/bench.sh never got the lock: its job was gone by 23:09).
# A: checks of the review's test fixes (on main, and with admission's log path off), the
#    branch's changed test files; B: main vs branch (src pinned at $BR) at 2,000 scraped
#    endpoints, 1/8/32 in flight, 2 rounds alternating (the harness of the branch head);
# C: in-process micro timings; D: ruff + mypy + the full suite on the branch head.
export HF_HUB_OFFLINE=1 HF_ENDPOINT=http://127.0.0.1:9 LITELLM_LOCAL_MODEL_COST_MAP=True
P=/work/main/.venv/bin/python
V=/work/main/.venv/bin
BR=${BR:?}
W=/tmp/s29b; OUT=$W/out; mkdir -p $OUT
date -u +"%T start" ; uptime
# ---- A
rm -rf $W/p-main $W/p-branch $W/p-nolog; mkdir -p $W/p-main $W/p-branch
git -C /work/wt/scale29 archive main | tar -x -C $W/p-main
git -C /work/wt/scale29 archive scale29 | tar -x -C $W/p-branch
HEAD=$(git -C /work/wt/scale29 rev-parse --short scale29); echo "head $HEAD" > $OUT/head.txt
cp -a $W/p-branch $W/p-nolog
sed -i 's/        if changed is not None:  # the views the live fleet replaced/        if False:  # the views the live fleet replaced/' $W/p-nolog/src/inferplane/admission/controller.py
grep -c "if False:  # the views" $W/p-nolog/src/inferplane/admission/controller.py >> $OUT/head.txt
cp $W/p-branch/tests/test_live.py $W/p-main/tests/test_live_branch.py
cp $W/p-branch/tests/test_admission_units.py $W/p-main/tests/test_admission_units_branch.py
{ echo "== main $(git -C /work/wt/scale29 rev-parse --short main) + the head's test_live.py: refreshed_snapshots (must fail)"
  (cd $W/p-main && PYTHONPATH=src:. timeout 120 $V/pytest -q -p no:cacheprovider tests/test_live_branch.py -k refreshed_snapshots 2>&1 | grep -E "^(FAILED|E  +assert|E  +AssertionError)|passed|failed" | head -24)
  echo "== main + the head's test_admission_units.py: pool_sums_kept (must fail)"
  (cd $W/p-main && PYTHONPATH=src:. timeout 120 $V/pytest -q -p no:cacheprovider tests/test_admission_units_branch.py -k pool_sums_kept 2>&1 | grep -E "^(FAILED|E  )|passed|failed" | head -12)
  echo "== head with admission's log path off: pool_sums_kept (must fail)"
  (cd $W/p-nolog && PYTHONPATH=src:. timeout 120 $V/pytest -q -p no:cacheprovider tests/test_admission_units.py -k pool_sums_kept 2>&1 | grep -E "^(FAILED|E  )|passed|failed" | head -12)
  echo "== 2857d57 (before the review fixes) + the head's test_live.py / test_health.py: removed_metrics_age_s and any_ejection_path must fail; snapshot_log_names (exact) passes there"
  rm -rf $W/p-prev; mkdir -p $W/p-prev; git -C /work/wt/scale29 archive 2857d57 | tar -x -C $W/p-prev
  cp $W/p-branch/tests/test_live.py $W/p-branch/tests/test_health.py $W/p-prev/tests/
  (cd $W/p-prev && PYTHONPATH=src:. timeout 120 $V/pytest -q -p no:cacheprovider tests/test_live.py tests/test_health.py -k "removed_metrics_age_s or any_ejection_path or snapshot_log_names" 2>&1 | grep -E "^(FAILED|E  )|passed|failed" | head -12)
  echo "== head $HEAD: the changed test files"
  (cd $W/p-branch && PYTHONPATH=src:. timeout 300 $V/pytest -q -p no:cacheprovider tests/test_live.py tests/test_admission_units.py tests/test_placement_filters.py tests/test_health.py tests/test_simulator.py 2>&1 | tail -4)
} > $OUT/checks.txt 2>&1
date -u +"%T A end"
# ---- B
rm -rf $W/b-main $W/b-branch; mkdir -p $W/b-main $W/b-branch
git -C /work/wt/scale29 archive main | tar -x -C $W/b-main
git -C /work/wt/scale29 archive $BR | tar -x -C $W/b-branch
git -C /work/wt/scale29 show scale29:bench/fleet_scale.py > $W/b-branch/bench/fleet_scale_head.py
git -C /work/wt/scale29 rev-parse --short main $BR > $OUT/commits.txt
cp -a /work/main/src/inferplane/_native $W/b-main/src/inferplane/
s=$(date +%s); (cd $W/b-branch && PYTHONPATH=src:. $P scripts/compile_native.py --strict > $OUT/native-branch.log 2>&1); echo "compile $(( $(date +%s)-s )) s" >> $OUT/native-branch.log
for t in main branch; do (cd $W/b-$t && echo "$t $(PYTHONPATH=src:. $P -c 'import inferplane.compiled as c; print(c.status())')") >> $OUT/compiled.txt; done
lscpu | grep -E "Model name|^CPU\(s\)|Model:|CPU family|Hypervisor" > $OUT/lscpu.txt; uptime >> $OUT/lscpu.txt
cd $W/b-branch
date -u +"%T scraped start"
timeout 420 $P bench/fleet_scale_head.py --endpoints 2000 --scraped --concurrency 1,8,32 --requests 400 --rounds 2 --name branch --other main=$W/b-main --json $OUT/scraped.json > $OUT/scraped.md 2> $OUT/scraped.err
if ! grep -q "^| 2000 | 32 | branch" $OUT/scraped.md; then
  date -u +"%T head harness failed: the $BR harness"
  timeout 420 $P bench/fleet_scale.py --endpoints 2000 --scraped --concurrency 1,8,32 --requests 400 --rounds 2 --name branch --other main=$W/b-main --json $OUT/scraped-old.json > $OUT/scraped-old.md 2> $OUT/scraped-old.err
fi
date -u +"%T scraped end"; uptime >> $OUT/lscpu.txt
# ---- C
PYTHONPATH=src:. $P -c "
from pathlib import Path
from bench.fleet_scale import fleet_yaml
Path('$W/fleet2000s.yaml').write_text(fleet_yaml(2000, 9, 18999, Path('$W/micro.sqlite3'), 5.0))"
for t in main branch; do
  (cd $W/b-$t && echo "# $t tree, $(date -u '+%F %T') UTC, $(uptime)" && PYTHONPATH=src:. timeout 120 $P $W/b-branch/docs/benchmarks/fleet-scale-s29/micro.py $W/fleet2000s.yaml) > $OUT/micro-$t.txt 2>&1
done
date -u +"%T micro end"
# ---- D
cd $W/p-branch
{ echo "head $HEAD"; $V/ruff check src tests bench 2>&1 | tail -2; timeout 300 $V/mypy 2>&1 | tail -3; } > $OUT/lint.txt 2>&1
date -u +"%T lint end"
if [ "$(date -u +%H%M)" -lt 2350 ] && [ "$(date -u +%H)" != 00 ]; then
  s=$(date +%s); PYTHONPATH=src:. timeout 480 $V/pytest -q -p no:cacheprovider > $OUT/suite.txt 2>&1; echo "rc=$? $(( $(date +%s)-s )) s" >> $OUT/suite.txt
else echo "not run: the slot reached D at $(date -u +%T), past 23:50 (scale29b's deadline 00:00)" > $OUT/suite.txt; fi
date -u +"%T end"
