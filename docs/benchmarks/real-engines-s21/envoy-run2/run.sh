#!/bin/bash
# Session 21, engineer envoyreal: the repeat of envoy-run1 without vllm-router (docs/benchmarks.md,
# "Envoy + the picker on real engines (session 21, engineer envoyreal)"). Run 2026-12-06
# 22:26:23-22:45:28 UTC through the session's queue, from the worktree at git d527a3c.
cd "$(git rev-parse --show-toplevel)"
HEAVY_WHO=envoyreal /work/bin/heavy env PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv \
  /work/main/.venv/bin/python bench/peers/real_engines.py --runs 3 --duration 120 --rate-scale 1 \
  --max-output 16 --budget 3600 --setup-limit 420 \
  --only "inferplane default" "inferplane envoy" "sglang-router cache_aware" \
  --out /work/exp/envoyreal-run2
