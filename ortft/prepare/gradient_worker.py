"""Runs ORT's gradient builder in its own environment (ortft/prepare/gradient_env.py); a standalone script.

    python gradient_worker.py LOSS_GRAPH OUT_DIR REQUIRES_GRAD_JSON [GRADIENTS_JSON]

writes OUT_DIR/training_model.onnx and OUT_DIR/eval_model.onnx for the loss graph, with gradients for
the tensors named in the JSON list. GRADIENTS_JSON, when given, lists gradient definitions for ops ORT
has no gradient of (ortft's placeholders, e.g. ortft/graph/blocked_attention.py): [{"key":
"domain::op_type[::operator::overload]", "nodes": [{"op_type", "domain", "inputs", "outputs",
"attributes": {name: {"value", "dtype"}}}]}], in the form of ORT's own custom gradient registry.
It imports only onnxruntime's training build and onnx: never ortft,
never torch, so it runs in the small builder venv. No optimizer graph and no checkpoint are kept: the
optimizer step and the trainable tensors' files are ortft's own.
"""

import importlib.util
import json
import os
import sys
import types


def _import_artifacts():
    """`onnxruntime.training.artifacts` without torch: `onnxruntime/training/__init__.py` imports the
    PyTorch front end, so register a bare namespace package for `onnxruntime.training` first."""
    spec = importlib.util.find_spec("onnxruntime")
    training_dir = os.path.join(list(spec.submodule_search_locations)[0], "training")
    namespace = types.ModuleType("onnxruntime.training")
    namespace.__path__ = [training_dir]
    namespace.__package__ = "onnxruntime.training"
    sys.modules["onnxruntime.training"] = namespace
    sys.modules.setdefault("onnxruntime.training.ortmodule", None)
    import onnxruntime
    from onnxruntime.training import artifacts

    onnxruntime.set_default_logger_severity(3)
    return artifacts


def _register_gradients(definitions):
    """Register each definition with ORT's gradient builder (`register_gradient_definition`)."""
    from onnxruntime.capi import _pybind_state as C

    for definition in definitions:
        nodes = []
        for spec in definition["nodes"]:
            node = C.GradientNodeDefinition()
            node.op_type, node.domain = spec["op_type"], spec.get("domain", "")
            node.inputs, node.outputs = spec["inputs"], spec["outputs"]
            attributes = []
            for name, attribute in spec.get("attributes", {}).items():
                entry = C.GradientNodeAttributeDefinition()
                entry.name, entry.value_json = name, json.dumps(attribute["value"])
                entry.dtype, entry.is_tensor = attribute["dtype"], attribute.get("is_tensor", False)
                attributes.append(entry)
            node.attributes = attributes
            nodes.append(node)
        C.register_gradient_definition(definition["key"], nodes)


def main(argv):
    loss_graph, out_dir, requires_grad_file = argv[1:4]
    with open(requires_grad_file, encoding="utf-8") as handle:
        requires_grad = json.load(handle)
    artifacts = _import_artifacts()
    if len(argv) > 4:
        with open(argv[4], encoding="utf-8") as handle:
            _register_gradients(json.load(handle))
    # Frozen weights are plain graph inputs of the loss graph (a weightless skeleton): nothing is frozen
    # as a parameter, and the generator's checkpoint holds the trainable tensors only (deleted below).
    artifacts.generate_artifacts(loss_graph, requires_grad=requires_grad, frozen_params=[], loss=None,
                                 optimizer=None, artifact_directory=out_dir)
    for leftover in ("checkpoint", "checkpoint.data"):
        path = os.path.join(out_dir, leftover)
        if os.path.exists(path):
            os.remove(path)


if __name__ == "__main__":
    main(sys.argv)
