#!/bin/bash
# lead's second run: land (main + session 29 branches incl. real29's scrape defaults) vs a
# scrapes-off variant vs vllm-router, 3 alternating reps
set -x
R=/tmp/re29b; M=$R/land-copy
rm -rf $M $R/out; mkdir -p $R
mkdir -p $M && git -C /work/wt/land archive 8fa4a18 | tar -x -C $M
for v in .venv .fidelity-venv .bench-venvs; do rm -f $M/$v; ln -s /work/main/$v $M/$v; done
echo tree 8fa4a18
(cd $M && PYTHONPATH=src:. /work/main/.venv/bin/python scripts/compile_native.py --strict) || exit 3
uptime; cd $M
PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv HF_HUB_OFFLINE=1 HF_ENDPOINT=http://127.0.0.1:9 \
  timeout 1500 /work/main/.venv/bin/python bench/peers/real_engines.py --runs 3 --duration 120 \
  --rate-scale 1 --max-output 16 --budget 1500 --setup-limit 420 --engine-cpus 1 --router-cpus 0 \
  --variant "noscrape=gateway.scrape_interval_s:3600" \
  --only "inferplane default" "inferplane default, noscrape" "vllm-router cache_aware" \
  --out $R/out
echo rc=$?; uptime
