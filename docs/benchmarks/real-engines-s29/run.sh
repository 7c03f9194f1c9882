#!/bin/bash
# lead's confirmation run on this host: main (0da9caa) default + fewer-scrapes variant vs vllm-router
set -x
R=/tmp/re29; M=$R/main-copy
rm -rf $M $R/out; mkdir -p $R
rsync -a --exclude .venv --exclude .fidelity-venv --exclude .bench-venvs /work/main/ $M/
for v in .venv .fidelity-venv .bench-venvs; do ln -s /work/main/$v $M/$v; done
(cd $M && git rev-parse HEAD && git status --short)
(cd $M && PYTHONPATH=src:. /work/main/.venv/bin/python scripts/compile_native.py --strict) || exit 3
uptime; cd $M
PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv HF_HUB_OFFLINE=1 HF_ENDPOINT=http://127.0.0.1:9 \
  timeout 3000 /work/main/.venv/bin/python bench/peers/real_engines.py --runs 6 --duration 120 \
  --rate-scale 1 --max-output 16 --budget 3000 --setup-limit 420 --engine-cpus 1 --router-cpus 0 \
  --variant "fewscrapes=gateway.stale_after_s:6,gateway.scrape_quiet_interval_s:3" \
  --only "inferplane default" "inferplane default, fewscrapes" "vllm-router cache_aware" \
  --out $R/out
echo rc=$?; uptime
