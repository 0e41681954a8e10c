#!/usr/bin/env bash
# A venv of its own for llama-cpp-python (llama.cpp's Python binding), built from the registry's source
# package (it has no wheels there): the slow tests check ortft's GGUF exports against llama.cpp with it.
# Needs cmake and a C/C++ compiler. Only the library is built (no examples, tools, server or multimodal
# helper), for this CPU. Idempotent: a stamp file records what was built; a ready venv costs a second.
# Prints the venv's Python on its last line. Knobs: LLAMA_CPP_VENV (default ~/.cache/ortft/venv-llama-cpp:
# outside the checkout, so a fresh clone on the same machine reuses the 10-30 minute build), PYTHON, JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${LLAMA_CPP_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ortft/venv-llama-cpp}
REQUIREMENT="llama-cpp-python==0.3.36"
stamp="$VENV/.ortft-llama-cpp-stamp"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$REQUIREMENT" ]; then
  echo "$VENV/bin/python"
  exit 0
fi
echo "[llama-cpp-venv] building $REQUIREMENT from source into $VENV (about 10 minutes on 2 cores)" >&2
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
export CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-$(nproc)}
export CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-binary llama-cpp-python "$REQUIREMENT" >&2
"$VENV/bin/python" -c "import llama_cpp" >&2
echo "$REQUIREMENT" > "$stamp"
echo "$VENV/bin/python"
