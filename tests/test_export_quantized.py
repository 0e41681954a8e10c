"""Tests of `ortft export --quantize int8|int4` (merged-onnx): small files, logits close to float32, clean errors.

The quantized export must compute exactly what the float32 model with the *dequantized* weights computes
(that checks the graph rewrite and the packing); how far that is from the float32 export is quantization
error, bounded loosely here (a tiny random model: int8 ~1%, int4 ~25% relative Frobenius on the logits).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.bundles import build_bundle
from helpers.reference import onnx_logits
from helpers.runs import make_run

from ortft.export import (
    InferenceTemplate,
    export_merged_onnx,
    export_run,
    merge_weights,
)
from ortft.quantize import quantize

ROOT = Path(__file__).resolve().parents[1]
# logits vs the float32 merged export, measured 1.2% (int8) and 24% (int4) on this tiny random llama
INT8_REL_BOUND = 0.05
INT4_REL_BOUND = 0.5


def _input_ids(vocab_size: int = 320, shape=(2, 10), seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=shape).astype(np.int64)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    bundle = build_bundle(root / "bundle", "llama")
    run = make_run(root / "run", bundle)
    made = {"bundle": bundle, "run": run, "root": root}
    for scheme in (None, "int8", "int4"):
        made[scheme] = export_run(run, root / f"export-{scheme}", quantize=scheme)
    return made


def _fake_quantized_logits(bundle, scheme: str, folder: Path, input_ids: np.ndarray, block_size: int = 32) -> np.ndarray:
    """Logits of the float32 template holding merged weights quantized and dequantized again in numpy."""
    template = InferenceTemplate(bundle.bundle_dir, bundle.manifest)
    base = template.read_weights(list(bundle.manifest["inference"]["weights"]))
    merged = {**base, **merge_weights(bundle.manifest, base, bundle.adapter)}
    fake = {}
    for name, weight in merged.items():
        facts = bundle.manifest["inference"]["weights"][name]
        if facts["initializer"] != name:
            continue  # a tied head (it reads the embedding table) stays float32
        axis = 1 if facts["layout"] == "out_in" else 0
        fake[name] = quantize(weight, scheme, axis, block_size).dequantize()
    folder.mkdir()
    template.write_merged(folder, fake)
    return onnx_logits(folder / "model.onnx", input_ids)


def _graph(export_dir: Path):
    import onnx

    return onnx.load(str(export_dir / "model.onnx"), load_external_data=False)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_files_are_much_smaller(exports, scheme):
    root = exports["root"]
    section = exports[scheme]["quantization"]
    fp32_data = (root / "export-None" / "model.onnx.data").stat().st_size
    data = (root / f"export-{scheme}" / "model.onnx.data").stat().st_size
    ratio = section["bytes_after"] / section["bytes_before"]
    # int8: 1 byte + a float32 scale per output channel; int4: half a byte + a float32 scale per 32 values
    assert (0.25 <= ratio < 0.28) if scheme == "int8" else (0.125 <= ratio < 0.16), ratio
    assert section["quantized_layers"] == 15 and not section["skipped"]  # 2 layers x 7 linears + the untied LM head
    # only the linear weights shrink; the embedding table and norms are copied as they were
    saved = section["bytes_before"] - section["bytes_after"]
    assert abs((fp32_data - data) - saved) < 64 * 64  # alignment padding at most
    assert data < (0.55 if scheme == "int8" else 0.47) * fp32_data
    assert section["model_bytes_after"] == sum((root / f"export-{scheme}" / name).stat().st_size for name in ("model.onnx", "model.onnx.data"))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_logits_equal_dequantized_weights_and_stay_close_to_float32(exports, scheme, tmp_path):
    input_ids = _input_ids()
    root = exports["root"]
    # ortft generate (and genai_config.json) run int8 exports with session.disable_quant_qdq: ORT 1.32's own
    # DequantizeLinear+MatMul fusion would quantize the activations too
    session_config = {"session.disable_quant_qdq": "1"} if scheme == "int8" else None
    quantized = onnx_logits(root / f"export-{scheme}" / "model.onnx", input_ids, session_config)
    reference = onnx_logits(root / "export-None" / "model.onnx", input_ids)
    fake = _fake_quantized_logits(exports["bundle"], scheme, tmp_path / "fake", input_ids)
    np.testing.assert_allclose(quantized, fake, atol=1e-4, rtol=0)
    relative = np.linalg.norm(quantized - reference) / np.linalg.norm(reference)
    assert 0 < relative < (INT8_REL_BOUND if scheme == "int8" else INT4_REL_BOUND), relative
    if scheme == "int8":
        assert np.abs(quantized - reference).max() < 0.05 * np.abs(reference).max()


def test_manifest_records_the_quantization(exports):
    written = json.loads((exports["root"] / "export-int4" / "manifest.json").read_text())
    assert written["quantization"] == exports["int4"]["quantization"]
    int4, int8 = exports["int4"]["quantization"], exports["int8"]["quantization"]
    assert (int4["scheme"], int4["block_size"], int4["op"], int4["accuracy_level"]) == ("int4", 32, "MatMulNBits", 1)
    assert (int8["scheme"], int8["block_size"], int8["op"]) == ("int8", None, "DequantizeLinear+MatMul")
    for section, bound in ((int8, 1 / 254), (int4, 1 / 14)):  # round-to-nearest bounds per group
        layer = section["layers"]["model.layers.0.self_attn.q_proj.weight"]
        assert layer["bytes_before"] == 64 * 64 * 4 and layer["initializer"] == "model.layers.0.self_attn.q_proj.weight"
        assert all(0 < facts["max_rel_error"] <= bound + 1e-6 for facts in section["layers"].values())
        assert section["max_rel_error"] == max(facts["max_rel_error"] for facts in section["layers"].values())
    assert not [p for p in exports["root"].iterdir() if p.name.startswith(".ortft-tmp-")]


def test_graph_ops(exports):
    root = exports["root"]
    int4_nodes = _graph(root / "export-int4").graph.node
    nbits = [node for node in int4_nodes if node.op_type == "MatMulNBits"]
    assert len(nbits) == 15 and all(node.domain == "com.microsoft" for node in nbits)
    attributes = {attr.name: attr.i for attr in nbits[0].attribute}
    assert attributes["bits"] == 4 and attributes["block_size"] == 32 and attributes["accuracy_level"] == 1
    assert not [node for node in int4_nodes if node.op_type == "DequantizeLinear"]
    int8 = _graph(root / "export-int8")
    assert sum(node.op_type == "DequantizeLinear" for node in int8.graph.node) == 15
    assert {tensor.data_type for tensor in int8.graph.initializer if tensor.name.endswith("_q")} == {3}  # int8


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_greedy_generation_runs(exports, scheme):
    from ortft.config import SamplingSettings
    from ortft.generate import Generator

    generator = Generator(exports["root"] / f"export-{scheme}", threads=1)
    assert generator.folder.session_config == ({"session.disable_quant_qdq": "1"} if scheme == "int8" else {})
    tokens = generator.generate_ids([1, 17, 42, 99], SamplingSettings(max_new_tokens=5, temperature=0))
    assert len(tokens) <= 5 and generator.stats.prompt_tokens == 4
    assert tokens == generator.generate_ids([1, 17, 42, 99], SamplingSettings(max_new_tokens=5, temperature=0))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tied_head_stays_float(tmp_path):
    bundle = build_bundle(tmp_path / "bundle", "llama", tie_word_embeddings=True)
    export_manifest = export_merged_onnx(bundle.bundle_dir, bundle.manifest, bundle.adapter, tmp_path / "export", quantize="int4")
    section = export_manifest["quantization"]
    assert "lm_head.weight" in section["skipped"] and section["quantized_layers"] == 14
    input_ids = _input_ids()
    np.testing.assert_allclose(onnx_logits(tmp_path / "export" / "model.onnx", input_ids),
                               _fake_quantized_logits(bundle, "int4", tmp_path / "fake", input_ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_in_out_layout_and_padded_blocks(scheme, tmp_path):
    """A weight read directly as MatMul's B ([in, out]) and one behind a Transpose, K not a multiple of the block."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from ortft.export_quantize import QuantizedExportWriter

    rng = np.random.default_rng(0)
    w_in_out = rng.normal(size=(48, 24)).astype(np.float32)  # K = 48: one and a half blocks of 32
    w_out_in = rng.normal(size=(16, 24)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "a"], ["h"]),
        helper.make_node("Transpose", ["b"], ["b_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "b_t"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [3, 48])], [helper.make_tensor_value_info("y", 1, [3, 16])],
                              [numpy_helper.from_array(w_in_out, "a"), numpy_helper.from_array(w_out_in, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (tmp_path / "inference").mkdir()
    onnx.save_model(model, str(tmp_path / "inference" / "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    manifest = {"inference": {"model": "inference/model.onnx", "weights": {"a": {"initializer": "a", "layout": "in_out"},
                                                                           "b": {"initializer": "b", "layout": "out_in"}}}}
    template = InferenceTemplate(tmp_path, manifest)
    out = tmp_path / "out"
    out.mkdir()
    section = QuantizedExportWriter(template, scheme, 32 if scheme == "int4" else None).write(out, {}, "model.onnx", "model.onnx.data")
    assert section["quantized_layers"] == 2
    x = rng.normal(size=(3, 48)).astype(np.float32)
    options = ort.SessionOptions()
    if scheme == "int8":  # what ortft generate and genai_config.json set: ORT 1.32's own int8 fusion quantizes activations
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    result = ort.InferenceSession(str(out / "model.onnx"), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    a = quantize(w_in_out, scheme, axis=0, block_size=32).dequantize()
    b = quantize(w_out_in, scheme, axis=1, block_size=32).dequantize()
    np.testing.assert_allclose(result, (x @ a) @ b.T, atol=1e-4, rtol=1e-5)


# ---- the command line ----------------------------------------------------------------------------------


def test_cli_quantize_and_user_errors(exports, tmp_path):
    from ortft.cli import main

    run = exports["run"]
    try:
        main(["export", str(run), "--out", str(tmp_path / "q4"), "--quantize", "int4", "--block-size", "64"])
    except SystemExit as exc:
        assert not exc.code
    written = json.loads((tmp_path / "q4" / "manifest.json").read_text())
    assert written["quantization"]["scheme"] == "int4" and written["quantization"]["block_size"] == 64
    bad = [
        ["--format", "peft", "--quantize", "int8"],
        ["--format", "adapter", "--quantize", "int4"],
        ["--quantize", "int4", "--block-size", "24"],
        ["--quantize", "int8", "--block-size", "32"],
        ["--block-size", "32"],
        ["--quantize", "int3"],
    ]
    for args in bad:
        with pytest.raises(SystemExit) as exit_info:
            main(["export", str(run), "--out", str(tmp_path / "bad"), *args])
        assert exit_info.value.code == 2, args
        assert not (tmp_path / "bad").exists()


def test_device_side_quantized_export_needs_no_torch(exports, tmp_path):
    from helpers.cli import BLOCK_HOST_PACKAGES

    out = tmp_path / "q4"
    script = BLOCK_HOST_PACKAGES + f"""
for args in (['export', {str(exports['run'])!r}, '--out', {str(out)!r}, '--quantize', 'int4'],
             ['generate', {str(out)!r}, '--prompt', 'hello', '--max-new-tokens', '4']):
    try:
        main(args)
    except SystemExit as exc:
        assert not exc.code, exc.code
assert 'torch' not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "int4: 15 linear layers" in result.stderr and "tokens/s" in result.stderr
