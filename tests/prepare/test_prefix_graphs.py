"""prepare --layers N writes the frozen-prefix cache's graphs (ortft/prepare/prefix_graphs.py, ortft/graph/prefix_split.py)."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx

from ortft.prefix_cache import cached_loss
from ortft.runtime import TrainingSession
from ortft.validate import validate_bundle
from helpers.bundles import tiny_bundle
from helpers.reference import batch_for


def test_layers_n_bundle_holds_prefix_and_suffix_graphs_that_share_its_weights(tmp_path_factory, tiny_model_factory):
    bundle = tiny_bundle(tmp_path_factory, tiny_model_factory("llama", num_hidden_layers=4), "llama4-last2", layers=2)
    manifest = json.loads((bundle / "manifest.json").read_text())
    section = manifest["prefix_cache"]
    assert section["layers"] == 2 and section["boundary"] == "/model/layers.1/Add_1_output_0"
    trainable = {entry["name"] for entry in manifest["trainable"]}
    prefix = onnx.load(str(bundle / section["prefix_graph"]), load_external_data=False)
    assert [v.name for v in prefix.graph.input] == ["input_ids", "attention_mask", "position_ids"]
    assert [v.name for v in prefix.graph.output] == ["hidden_states"]
    assert not any("layers.2/" in node.name or "layers.3/" in node.name for node in prefix.graph.node)
    for key in ("training_graph", "eval_graph"):
        suffix = onnx.load(str(bundle / section[key]), load_external_data=False)
        inputs = [v.name for v in suffix.graph.input]
        assert inputs[0] == "hidden_states" and "input_ids" not in inputs and trainable <= set(inputs)
        # of the frozen layers only a few shape nodes (rotary embedding unsqueezes) are left: no product
        left = [node.op_type for node in suffix.graph.node if re.search(r"layers\.[01]/", node.name)]
        assert len(left) < 10 and "MatMul" not in left and "Gemm" not in left, left
        locations = {entry.value for tensor in suffix.graph.initializer for entry in tensor.external_data
                     if entry.key == "location"}
        assert locations == {"frozen_weights.data"}  # the bundle's weights, not a copy
    # prefix then suffix computes the full graphs' loss, on a padded batch
    batch = batch_for(manifest)
    full = float(np.asarray(TrainingSession(bundle, threads=1, with_optimizer=False).evaluate(batch)))
    assert abs(cached_loss(bundle, manifest, batch, threads=1) - full) <= 1e-6 * abs(full)
    checks = {name: ok for name, ok, _ in validate_bundle(bundle, threads=1).checks}
    assert checks["prefix cache graphs give the full graphs' loss"]


def test_a_bundle_adapted_in_every_layer_has_no_prefix_cache(tmp_path_factory, tiny_llama):
    bundle = tiny_bundle(tmp_path_factory, tiny_llama, "llama-noclip", max_grad_norm=0.0)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["prefix_cache"] is None
    assert not (bundle / "prefix_model.onnx").exists()
