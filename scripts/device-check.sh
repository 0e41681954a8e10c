#!/usr/bin/env bash
# Device-only check: a second environment .venv-device with ortft's core dependencies only (stock
# onnxruntime; no torch, transformers, peft, optimum) runs the device commands on a bundle the host made.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEV=.venv-device
stamp="$DEV/.ortft-setup-stamp"
want=$(cat pyproject.toml scripts/device-check.sh | sha256sum | cut -d' ' -f1)
if [ ! -x "$DEV/bin/python" ]; then
  "$PYTHON" -m venv "$DEV"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # made before ortft moved to stock onnxruntime: the training build goes (one onnxruntime per environment)
  if "$DEV/bin/python" -m pip show -q onnxruntime-training-cpu >/dev/null 2>&1; then
    "$DEV/bin/python" -m pip uninstall -q -y onnxruntime-training-cpu onnxruntime
  fi
  "$DEV/bin/python" -m pip install -q --disable-pip-version-check . 2>&1 | grep -v "^WARNING: Location" || true
  echo "$want" > "$stamp"
fi
# ortft itself as a device installs it: a plain (non-editable) install of this tree, fresh every run, so
# a module that only works from the source tree (a missing import, an unpackaged file) fails here.
"$DEV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall . 2>&1 \
  | grep -v "^WARNING: Location" || true

for host_only in torch transformers peft optimum; do
  if "$DEV/bin/python" -c "import $host_only" 2>/dev/null; then
    echo "[device-check] FAIL: $host_only is installed in $DEV" >&2; exit 1
  fi
done
if "$DEV/bin/python" -m pip show -q onnxruntime-training-cpu >/dev/null 2>&1; then
  echo "[device-check] FAIL: $DEV holds the training build; the device runs stock onnxruntime" >&2; exit 1
fi
"$DEV/bin/python" -c "import ortft, ortft.cli, ortft.runtime; ortft.runtime.onnxruntime_module().InferenceSession"
"$DEV/bin/ortft" --help >/dev/null
"$DEV/bin/ortft" doctor
"$DEV/bin/ortft" doctor --json | "$DEV/bin/python" -c 'import json, sys; facts = json.load(sys.stdin); assert facts["training"].startswith("ok"), facts["training"]; assert facts["onnxruntime"].startswith("onnxruntime "), facts["onnxruntime"]'

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The host makes a tiny model and its bundle; the device environment does the rest.
.venv/bin/python -m ortft.prepare.tiny "$work/model" >/dev/null
.venv/bin/ortft prepare "$work/model" --out "$work/bundle" --rank 4 --alpha 8 2>/dev/null
"$DEV/bin/ortft" validate "$work/bundle"
"$DEV/bin/ortft" info "$work/bundle" >/dev/null
for cmd in train eval export generate; do
  if "$DEV/bin/ortft" --help | grep -q "^  $cmd "; then :; else echo "[device-check] note: 'ortft $cmd' not available yet"; fi
done
if [ -f data/sft/train.jsonl ] && "$DEV/bin/ortft" --help | grep -q "^  train "; then
  "$DEV/bin/ortft" train "$work/bundle" --data data/sft/train.jsonl --valid data/sft/valid.jsonl --out "$work/run" \
    --steps 4 --batch-size 2 --seq-len 64 --eval-every 2 --save-every 2 --max-eval-batches 2
  "$DEV/bin/ortft" eval "$work/run" --data data/sft/valid.jsonl --batch-size 2 --json
  "$DEV/bin/ortft" export "$work/run" --out "$work/export"
  "$DEV/bin/ortft" export "$work/run" --out "$work/peft" --format peft
  "$DEV/bin/ortft" generate "$work/export" --prompt "Hello" --max-new-tokens 8
fi
if [ -f data/ner/train.jsonl ]; then
  # token classification: a tiny BERT NER bundle from the host; train, eval, export and predict here
  .venv/bin/python -m ortft.prepare.tiny "$work/bert" bert >/dev/null
  .venv/bin/ortft prepare "$work/bert" --out "$work/ner-bundle" --task token-cls \
    --labels O,B-PER,I-PER,B-LOC,I-LOC,B-ORG,I-ORG --rank 4 --alpha 8 2>/dev/null
  "$DEV/bin/ortft" train "$work/ner-bundle" --data data/ner/train.jsonl --valid data/ner/valid.jsonl --out "$work/ner-run" \
    --steps 4 --batch-size 4 --seq-len 64 --eval-every 2 --save-every 4 --max-eval-batches 2
  "$DEV/bin/ortft" eval "$work/ner-run" --data data/ner/valid.jsonl --json | "$DEV/bin/python" -c 'import json, sys; record = json.load(sys.stdin); assert {"accuracy", "precision", "recall", "f1"} <= set(record), record'
  "$DEV/bin/ortft" export "$work/ner-run" --out "$work/ner-export"
  "$DEV/bin/ortft" predict "$work/ner-export" --data data/ner/sentences.jsonl --out "$work/ner-predictions.jsonl"
  "$DEV/bin/ortft" predict "$work/ner-run" --data data/ner/sentences.jsonl >/dev/null
fi
echo "[device-check] ok: device commands ran without torch/transformers"
