#!/bin/bash
# p90-28's final run: main vs the branch with gateway.scrape_defer_prefill_s vs vllm-router
set -x
R=/tmp/p90-28
B=$R/branch-copy
M=$R/main-copy
rm -rf $B $M $R/out
rsync -a --exclude .venv --exclude .fidelity-venv --exclude .bench-venvs /work/wt/p90-28/ $B/
rsync -a --exclude .venv --exclude .fidelity-venv --exclude .bench-venvs --exclude .git /work/main/ $M/
for d in $B $M; do
  ln -s /work/main/.venv $d/.venv; ln -s /work/main/.fidelity-venv $d/.fidelity-venv
  ln -s /work/main/.bench-venvs $d/.bench-venvs
done
(cd /work/wt/p90-28 && git rev-parse HEAD && git status --short)
(cd /work/main && git rev-parse HEAD && git status --short)
(cd $B && PYTHONPATH=src:. /work/main/.venv/bin/python scripts/compile_native.py --strict) || exit 3
(cd $M && PYTHONPATH=src:. /work/main/.venv/bin/python scripts/compile_native.py --strict) || exit 3
cat > $R/main-python.sh <<EOW
#!/bin/bash
export PYTHONPATH=$M/src
exec /work/main/.venv/bin/python "\$@"
EOW
chmod +x $R/main-python.sh
$R/main-python.sh -c 'import inferplane, inferplane.compiled as c; print(inferplane.__file__, c.status())'
(cd $B && PYTHONPATH=src /work/main/.venv/bin/python -c 'import inferplane, inferplane.compiled as c; print(inferplane.__file__, c.status())')
(cd $B && PYTHONPATH=src:. HF_HUB_OFFLINE=1 timeout 240 /work/main/.venv/bin/pytest -q -p no:cacheprovider tests/test_scrape_defer.py 2>&1 | tail -3)
uptime
cd $B
PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv HF_HUB_OFFLINE=1 HF_ENDPOINT=http://127.0.0.1:9 \
  timeout 3300 /work/main/.venv/bin/python bench/peers/real_engines.py --runs 6 --duration 120 \
  --rate-scale 1 --max-output 16 --budget 3600 --setup-limit 420 --engine-cpus 1 --router-cpus 0 \
  --gateway-python main=$R/main-python.sh --variant "defer=gateway.scrape_defer_prefill_s:0.5" \
  --only "inferplane default, main" "inferplane default, defer" "vllm-router cache_aware" \
  --out $R/out
echo rc=$?
uptime
