#!/bin/bash
# Session 21, engineer envoyreal: Envoy + the picker on real engines (docs/benchmarks.md,
# "Envoy + the picker on real engines (session 21, engineer envoyreal)"). Run 2026-12-06
# 21:40:54-22:05:54 UTC through the session's queue, from the worktree at git b3234ed.
# results.md was re-rendered afterwards (git 418db93: the setup's note below the table after a
# blank line) with
#   PYTHONPATH=src:. python bench/peers/real_engines.py --render-only results.json --out .
cd "$(git rev-parse --show-toplevel)"
HEAVY_WHO=envoyreal /work/bin/heavy env PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv \
  /work/main/.venv/bin/python bench/peers/real_engines.py --runs 3 --duration 120 --rate-scale 1 \
  --max-output 16 --budget 3600 --setup-limit 420 \
  --only "inferplane default" "inferplane envoy" "sglang-router cache_aware" "vllm-router cache_aware" \
  --out /work/exp/envoyreal-run1
