"""Tests of `ortft info BUNDLE` (ortft/commands/info.py): how a quantized bundle's embedding table is stored.

The int8-exact bundle is a tiny tied Llama whose table holds a GGUF Q8_0 table's values, prepared with
--quantize int4 (tests/helpers/quantized.py); the other `quantization.embeddings` values are hand-made sections.
"""

from __future__ import annotations

import json

import pytest
from helpers.bundles import tiny_bundle
from helpers.cli import ok, run_ortft, user_error

from ortft.commands.info import quantization_lines

EXACT_LINE = "embeddings   int8, exact (the GGUF's Q8_0 table, 32 values per scale)"


@pytest.fixture(scope="module")
def exact_bundle(q8_0_llama, tmp_path_factory):
    return tiny_bundle(tmp_path_factory, q8_0_llama, "llama-q8_0-int4", quantize="int4")


def _section(scheme: str, embeddings) -> dict:
    layer = {"bytes_before": 16384, "bytes_after": 2560, "max_rel_error": 0.05, "rel_rms_error": 0.02}
    return {"scheme": scheme, "block_size": 32 if scheme == "int4" else None, "symmetric": True, "embeddings": embeddings,
            "layers": {"model.layers.0.mlp.up_proj.base_layer.weight": layer}, "recomputed_for_backward": 1,
            "frozen_bytes_before": 16384, "frozen_bytes_after": 2560, "max_rel_error": 0.05, "mean_rel_rms_error": 0.02}


def test_info_says_an_int8_exact_table_is_stored_exactly(exact_bundle):
    manifest = json.loads((exact_bundle / "manifest.json").read_text())
    assert manifest["quantization"]["embeddings"] == "int8-exact"
    lines = ok(run_ortft("info", exact_bundle)).stdout.splitlines()
    assert EXACT_LINE in lines
    assert lines.index(EXACT_LINE) == next(i for i, line in enumerate(lines) if line.startswith("quantized    int4 block 32")) + 1
    table = next(line for line in lines if "model.embed_tokens.weight" in line)
    assert "max rel 0.0000  rms 0.0000" in table  # lossless


@pytest.mark.parametrize(("scheme", "embeddings", "expected"), [
    ("int4", True, "embeddings   int4 block 32, quantized with the linear weights (--quantize-embeddings; also the LM head)"),
    ("int8", True, "embeddings   int8, quantized with the linear weights (--quantize-embeddings; also the LM head)"),
    ("int4", False, "embeddings   float32"),
    ("int8", False, "embeddings   float32"),
])
def test_info_describes_quantized_and_float_tables(scheme, embeddings, expected):
    lines = quantization_lines(_section(scheme, embeddings))
    assert expected in lines and not any("exact" in line for line in lines)


def test_a_wrong_embeddings_value_is_a_bundle_error(exact_bundle, tmp_path):
    import shutil

    bundle = shutil.copytree(exact_bundle, tmp_path / "b", symlinks=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["quantization"]["embeddings"] = "int9-exact"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    user_error(run_ortft("info", bundle), "lacks a field `info` shows or has a wrong type", "int9-exact")
