#!/usr/bin/env bash
# The README's test command: set up (idempotently), run the whole test suite, then the
# device-only check. Extra arguments go to pytest (e.g. -k prepare, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/python -m pytest "$@"
./scripts/device-check.sh
