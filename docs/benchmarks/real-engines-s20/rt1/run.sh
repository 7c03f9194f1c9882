cd /work/wt/rt
touch /work/QUIET
PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv /work/main/.venv/bin/python bench/peers/real_engines.py --runs 3 --duration 120 --rate-scale 1 --max-output 16 --budget 3600 --setup-limit 420 --only "inferplane default" "sglang-router cache_aware" "vllm-router cache_aware" --router-rt 1 --out /work/exp/rt1
rc=$?
rm -f /work/QUIET
exit $rc
