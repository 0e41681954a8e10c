"""scripts/ep-check.sh openvino end to end: onnxruntime-openvino (in a venv of its own, no stock
onnxruntime) trains a tiny bundle with the OpenVINO provider and with ORT's CPU provider, and the
per-step losses agree. Never skipped: if onnxruntime-openvino cannot be installed, that is a failure.
About 70 s with a fresh venv, 15-25 s when .venv-ep-openvino exists.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "ep-check.sh"


@pytest.mark.slow
def test_ep_check_openvino_losses_agree():
    completed = subprocess.run(
        [str(SCRIPT), "openvino"], cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    assert "[ep-check] losses agree" in completed.stdout, output[-4000:]


def test_ep_check_refuses_unknown_provider():
    for args in ([], ["no-such-provider"], ["openvino", "--no-such-option"]):
        completed = subprocess.run([str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
        assert completed.returncode == 2, (args, completed.stdout, completed.stderr)
        assert "error:" in completed.stderr
