"""Shared fixtures: tiny random models saved as Hugging Face folders (built from configs, never downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ortft.prepare.tiny import TINY_VOCAB, save_tiny_model, tiny_config  # noqa: F401  (re-exported for tests)

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Returns make(model_type, task='causal-lm', **overrides) -> Path of a saved tiny model (cached)."""
    cache: dict = {}

    def make(model_type: str, task: str = "causal-lm", **overrides) -> Path:
        key = (model_type, task, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{model_type}-{task}")
            cache[key] = save_tiny_model(folder, model_type, task, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")
