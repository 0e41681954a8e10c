"""Smoke test of scripts/bench_qlora.py's measuring child on a tiny int4 bundle (figures exist, never timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers.bundles import prepare_tiny

ROOT = Path(__file__).resolve().parents[2]


def test_measure_reports_losses_and_a_sampled_peak_pss(tiny_llama, tmp_path):
    bundle = tmp_path / "int4"
    prepare_tiny(tiny_llama, bundle, quantize="int4")
    command = [sys.executable, str(ROOT / "scripts" / "bench_qlora.py"), "--measure", str(bundle), "--steps", "3",
               "--seq", "16", "--valid-batches", "2", "--threads", "1"]
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    assert result["valid_loss_init"] > 0 and result["valid_loss_final"] > 0
    assert result["tokens_per_s"] > 0
    # PSS comes from the sampler process: present, and no larger than the process's peak RSS.
    assert 0 < result["peak_pss_mb"] <= result["peak_rss_mb"] * 1.01


def test_training_bytes_leave_out_the_inference_template_and_the_tokenizer():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ortft_bench_qlora_script", ROOT / "scripts" / "bench_qlora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    files = {name: {"bytes": size} for name, size in (
        ("training_model.onnx", 1), ("eval_model.onnx", 2), ("initial_adapter.safetensors", 4), ("frozen_weights.data", 8),
        ("quantized_weights.data", 16), ("inference_model.onnx", 32), ("inference_model.onnx.data", 64),
        ("inference/config.json", 128), ("tokenizer/tokenizer.json", 256))}
    assert module.training_bytes(files) == 31  # frozen_weights.data is the training graphs' (the template reads it too)
