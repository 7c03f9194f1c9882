#!/bin/bash
# stand-in validation of the `inferplane envoy` setup (envoyreal, session 21)
# (run as /work/exp/envoyreal/standin.sh, ledger_check.py beside it; copied here as it ran)
set -u
cd /work/wt/envoyreal
export PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv
PY=/work/main/.venv/bin/python
OUT=/work/exp/envoyreal
date -u
$PY /work/exp/envoyreal/ledger_check.py 60 > $OUT/ledger_check.log 2>&1; echo "ledger_check rc=$?"
date -u
PORTS=$($PY -c "from bench.peers.procs import free_ports; print(' '.join(map(str, free_ports(3))))")
PIDS=()
for p in $PORTS; do
  setsid $PY bench/peers/fake_engine.py --port $p > $OUT/fake-$p.log 2>&1 &
  PIDS+=($!)
done
sleep 3
URLS=$(for p in $PORTS; do printf "http://127.0.0.1:%s," $p; done); URLS=${URLS%,}
for c in 1 2; do
  $PY bench/peers/real_engines.py --urls "$URLS" --runs 2 --duration 60 --rate-scale 1 \
    --max-output 16 --warmup-s 0 --budget 1200 --setup-limit 300 --envoy-concurrency $c \
    --only "inferplane default" "inferplane envoy" --out $OUT/standin-c$c > $OUT/standin-c$c.log 2>&1
  echo "standin c$c rc=$?"; date -u
done
for pid in "${PIDS[@]}"; do kill -- -$pid 2>/dev/null || kill $pid; done
