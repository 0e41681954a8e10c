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
