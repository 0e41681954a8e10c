#!/usr/bin/env bash
# Idempotent set-up of the host environment .venv: torch (CPU) first, then ortft with the
# [prepare,plot,dev] extras in editable mode. Re-running on a ready environment takes seconds.
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
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, pinned: the CPU build on the machine's disk. Unpinned, pip would pull a CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e '.[prepare,plot,dev]'
echo "$want" > "$stamp"
echo "[setup] $VENV ready"
