#!/usr/bin/env bash
# A venv of its own for onnxruntime-genai (Microsoft's on-device LLM runtime), which installs its own
# onnxruntime: it never shares ortft's environments. The tests that check ortft's exports against
# onnxruntime-genai run their script with this venv's Python (tests/helpers/genai_runner.py).
# Idempotent: a stamp file records what was installed; a ready venv costs a second.
# Prints the venv's Python on its last line. Knobs: GENAI_VENV (default .venv-genai), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${GENAI_VENV:-.venv-genai}
# 0.18.0: the release whose config keys and Adapters API ortft's genai_config.json was written for.
REQUIREMENTS="onnxruntime-genai==0.18.0 numpy>=1.24"
stamp="$VENV/.ortft-genai-stamp"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$REQUIREMENTS" ]; then
  echo "$VENV/bin/python"
  exit 0
fi
echo "[genai-venv] installing $REQUIREMENTS into $VENV" >&2
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
# shellcheck disable=SC2086  # the requirements are separate words
"$VENV/bin/python" -m pip install -q --disable-pip-version-check $REQUIREMENTS >&2
"$VENV/bin/python" -c "import onnxruntime_genai" >&2
echo "$REQUIREMENTS" > "$stamp"
echo "$VENV/bin/python"
