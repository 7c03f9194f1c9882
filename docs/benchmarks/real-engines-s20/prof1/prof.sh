cd /work/wt/rt
touch /work/QUIET
OUT=/work/exp/prof1; mkdir -p $OUT
( for i in $(seq 1 600); do
    pid=$(pgrep -f "inferplane.cli serve" | head -1)
    if [ -n "$pid" ]; then break; fi; sleep 0.5; done
  echo "gateway pid $pid" > $OUT/pyspy.log
  sleep 20
  /work/main/.venv/bin/py-spy record --pid $pid --rate 200 --nonblocking --format raw -d 80 -o $OUT/gateway.raw >> $OUT/pyspy.log 2>&1
  cat /proc/$pid/task/*/schedstat > $OUT/schedstat-after.txt 2>/dev/null
) &
PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv /work/main/.venv/bin/python bench/peers/real_engines.py --runs 1 --duration 120 --rate-scale 1 --max-output 16 --budget 3600 --setup-limit 420 --only "inferplane default" --router-rt 1 --out $OUT
rc=$?
wait
rm -f /work/QUIET
exit $rc
