"""SmolLM2-135M (real weights): int8/int4 bundles reduce validation loss >= 90% as much as float32 (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quantized_smollm2_learns_like_float32(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_qlora.py"), "--model", "smollm2", "--work", str(tmp_path),
         "--steps", "20", "--schemes", "fp32,int8,int4"],
        check=True, capture_output=True, text=True,
    )
    rows = {row["variant"]: row for row in json.loads(result.stdout[result.stdout.index("[\n"):])}
    assert rows["fp32"]["valid_loss_drop"] > 0
    for scheme in ("int8", "int4"):
        assert rows[scheme]["drop_vs_fp32"] >= 0.9, rows[scheme]
        assert rows[scheme]["frozen_mb_after"] < rows["fp32"]["frozen_mb_after"]
