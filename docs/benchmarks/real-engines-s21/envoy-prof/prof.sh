#!/bin/bash
# stand-ins: where the `inferplane envoy` setup's CPU goes (envoyreal, session 21)
# (run as /work/exp/envoyreal/prof.sh with the script beside it; copied here as it ran)
cd /work/wt/envoyreal
export PYTHONPATH=src:. FIDELITY_VENV=/work/main/.fidelity-venv
PY=/work/main/.venv/bin/python
O=/work/exp/envoyreal/prof
mkdir -p $O
date -u; echo "git $(git rev-parse --short HEAD) load $(cat /proc/loadavg)"
echo "== observer on"; $PY docs/benchmarks/real-engines-s21/envoy-prof/prof.py 60 $O/obs
echo "== observer off"; NOOBS=1 $PY docs/benchmarks/real-engines-s21/envoy-prof/prof.py 60 $O/noobs
echo "== observer on, py-spy"; PYSPY=1 $PY docs/benchmarks/real-engines-s21/envoy-prof/prof.py 60 $O/spy
date -u; echo "load $(cat /proc/loadavg)"
