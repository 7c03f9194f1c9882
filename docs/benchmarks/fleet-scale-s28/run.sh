#!/bin/bash
set -x
export HF_HUB_OFFLINE=1 HF_ENDPOINT=http://127.0.0.1:9 LITELLM_LOCAL_MODEL_COST_MAP=True
P=/work/main/.venv/bin/python
cd /tmp/s28/trees/main && PYTHONPATH=src:. timeout 300 $P bench/placement_speed.py --dump /tmp/s28/out/dump-main.json > /tmp/s28/out/dump-main.log 2>&1
cd /tmp/s28/trees/branch && PYTHONPATH=src:. timeout 300 $P bench/placement_speed.py --dump /tmp/s28/out/dump-branch.json > /tmp/s28/out/dump-branch.log 2>&1
cmp /tmp/s28/out/dump-main.json /tmp/s28/out/dump-branch.json && echo DUMPS IDENTICAL
lscpu | grep -E "Model name|^CPU\(s\)|Model:|CPU family" > /tmp/s28/out/lscpu.txt; uptime >> /tmp/s28/out/lscpu.txt
cd /tmp/s28/trees/branch && timeout 900 $P bench/fleet_scale.py --endpoints 4,2000 --requests 400 --rounds 3 --name branch --other main=/tmp/s28/trees/main --json /tmp/s28/out/fleet_scale.json > /tmp/s28/out/fleet_scale.md 2> /tmp/s28/out/fleet_scale.err
uptime >> /tmp/s28/out/lscpu.txt
