#!/bin/bash
cd /work/wt/lead
echo "start $(date -u) git $(git rev-parse --short HEAD) load $(cat /proc/loadavg)"
env PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv /work/main/.venv/bin/python bench/peers/real_engines.py --runs 3 --duration 120 --rate-scale 1 --max-output 16 --budget 3600 --setup-limit 420 --only "envoy null-picker round_robin" "envoy LEAST_REQUEST" "sglang-router cache_aware" --out /work/exp/nullrun
rc=$?
echo "end $(date -u) rc=$rc load $(cat /proc/loadavg)"
