"""Point the inference template at the training graphs' stored weights: a bundle holds each frozen weight once.

`ortft prepare` exports the inference template (base model with KV cache) with its own copy of every
weight, and the training and eval graphs keep theirs in frozen_weights.data (float) and, for QLoRA
bundles, quantized_weights.data (int8/int4). This pass, run after both exist, makes the template read
those files instead and drops its copy (SmolLM2-135M float32: 513 MB less):

- a float weight stored as it is: the template's initializer points at its bytes in frozen_weights.data;
- a frozen 2-D weight the training graphs store transposed ([in, out], graph_patches.pretransposed_frozen_weights):
  the template reads it as it is stored, its Transpose nodes removed (MatMul(x, W_t)); layout `in_out`;
- a quantized weight: the template gets the same DequantizeLinear (int4 needs opset 21: the template is
  converted) of the same tensors in quantized_weights.data. The template then runs the dequantized base
  the adapters were trained against, and exports fold adapters into that.

Each weight is matched by name (PEFT's `base_model.model.NAME`, `.base_layer` for adapted layers) and
checked by value (float: equal bit for bit, as stored or transposed; quantized: within quantization error);
a weight without a match keeps its own bytes in inference_model.onnx.data. The template moves to the
bundle root (ONNX Runtime refuses external data outside the model's folder) as inference_model.onnx, and
the manifest's `inference.parameters` records, per Hugging Face parameter, the graph value that holds it,
its layout, the file and training tensor it comes from, and how it is dequantized. Host side (prepare),
but numpy and onnx only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..graph.quantize_weights import DEQUANTIZED_SUFFIX
from ..inference_template import dequantize_linear, store_external
from ..bundle import EVAL_GRAPH, FROZEN_DATA, INFERENCE_TEMPLATE, INFERENCE_TEMPLATE_DATA, QUANTIZED_DATA

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
MAX_QUANTIZATION_ERROR = 0.25  # relative RMS error above which a quantized tensor is not taken for the template's weight


def share_template_weights(bundle_dir: Path, section: dict, trainable: list[dict]) -> dict:
    """Rewrite the template in `bundle_dir` (section['model']) to read the training graphs' weight files;
    write it as INFERENCE_TEMPLATE at the bundle root, delete the old files, and return the new manifest section."""
    import onnx

    from ..graph.upgrade_opset import UpgradeOpset, default_opset

    bundle_dir = Path(bundle_dir)
    old_path = bundle_dir / section["model"]
    template = onnx.load(str(old_path), load_external_data=False)
    eval_graph = onnx.load(str(bundle_dir / EVAL_GRAPH), load_external_data=False).graph
    stored = _stored_tensors(eval_graph)
    dequantizers = _dequantizers(eval_graph)
    del eval_graph
    adapted = {entry["base_weight"] for entry in trainable if entry.get("base_weight")}
    graph = template.graph
    layouts_before = {facts["initializer"]: facts["layout"] for facts in section["weights"].values()}
    matches = {}
    for tensor in graph.initializer:
        match = _match(bundle_dir, old_path.parent, tensor, _training_names(tensor.name, adapted), stored, dequantizers)
        if match is not None:
            matches[tensor.name] = match
    if any(match["kind"] == "quantized" and match["int4"] for match in matches.values()) and default_opset(template) < 21:
        UpgradeOpset(21).call(template)  # DequantizeLinear with int4 and block_size
    parameters = _rewrite(template, matches, layouts_before, bundle_dir, old_path.parent)
    onnx.save_model(template, str(bundle_dir / INFERENCE_TEMPLATE))
    for leftover in {old_path, old_path.parent / "model.onnx.data"}:
        leftover.unlink(missing_ok=True)
    weights = {}
    for hf_name, facts in section["weights"].items():
        target = next(name for name, record in parameters.items() if record["initializer"] == facts["initializer"])
        weights[hf_name] = {"initializer": parameters[target]["value"], "layout": parameters[target]["layout"]}
    shared = {kind: sum(1 for record in parameters.values() if record["file"] == kind) for kind in (FROZEN_DATA, QUANTIZED_DATA, INFERENCE_TEMPLATE_DATA)}
    log.info("inference template reads %s", shared)
    for record in parameters.values():
        del record["initializer"]
    return {**section, "model": INFERENCE_TEMPLATE, "weights": weights, "parameters": parameters, "shared_weights": shared}


# ---- what the training graphs store ---------------------------------------------------------------------


def _stored_tensors(graph) -> dict:
    """Initializers of the eval graph kept in the bundle's weight files: name -> TensorProto (external)."""
    import onnx

    stored = {}
    for tensor in graph.initializer:
        facts = {entry.key: entry.value for entry in tensor.external_data}
        if tensor.data_location == onnx.TensorProto.EXTERNAL and facts.get("location") in (FROZEN_DATA, QUANTIZED_DATA):
            stored[tensor.name] = tensor
    return stored


def _dequantizers(graph) -> dict[str, list]:
    """Training tensor name -> its DequantizeLinear nodes in the eval graph (several for a weight split in column parts)."""
    found: dict[str, list] = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or not node.output[0].endswith(DEQUANTIZED_SUFFIX):
            continue
        weight = node.output[0][: -len(DEQUANTIZED_SUFFIX)]
        part = None
        if "/part" in weight:
            weight, part = weight.rsplit("/part", 1)
        found.setdefault(weight, []).append((int(part) if part is not None else 0, node))
    return {name: [node for _index, node in sorted(nodes, key=lambda item: item[0])] for name, nodes in found.items()}


def _training_names(hf_name: str, adapted: set[str]) -> list[str]:
    """The names the PEFT-wrapped training graph gives this parameter (adapted layers keep theirs in base_layer)."""
    names = [PEFT_PREFIX + hf_name]
    if hf_name in adapted:
        names.insert(0, PEFT_PREFIX + hf_name.removesuffix(".weight") + ".base_layer.weight")
    return names


def _external(tensor) -> dict:
    return {entry.key: entry.value for entry in tensor.external_data}


def _read(folder: Path, tensor) -> np.ndarray:
    """An initializer's values (external data relative to `folder`, or inline)."""
    from onnx import helper, numpy_helper

    if tensor.data_location != 1:  # onnx.TensorProto.EXTERNAL
        return numpy_helper.to_array(tensor)
    facts = _external(tensor)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    count = int(np.prod(list(tensor.dims))) if tensor.dims else 1
    with open(folder / facts["location"], "rb") as handle:
        handle.seek(int(facts.get("offset", 0)))
        data = handle.read(int(facts.get("length", count * dtype.itemsize)))
    return np.frombuffer(data, dtype=dtype).reshape(list(tensor.dims))


def _raw(folder: Path, tensor) -> bytes:
    facts = _external(tensor)
    with open(folder / facts["location"], "rb") as handle:
        handle.seek(int(facts.get("offset", 0)))
        return handle.read(int(facts["length"]))


def _dequantize(bundle_dir: Path, nodes: list, stored: dict) -> np.ndarray:
    """What the DequantizeLinear node(s) compute; column parts are joined along the last axis."""
    parts = []
    for node in nodes:
        attributes = {attribute.name: attribute.i for attribute in node.attribute}
        tensors = [stored[name] for name in node.input if name]
        raw = [(tensor.data_type, list(tensor.dims), _raw(bundle_dir, tensor)) for tensor in tensors]
        parts.append(dequantize_linear(raw[0], raw[1], raw[2] if len(raw) > 2 else None, attributes.get("axis", 1), attributes.get("block_size", 0)))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)


def _match(bundle_dir: Path, template_dir: Path, tensor, names: list[str], stored: dict, dequantizers: dict) -> dict | None:
    """How the training graphs store this template weight, checked by value; None if they do not."""
    dims = list(tensor.dims)
    for name in names:
        if name in stored and stored[name].data_type == tensor.data_type:
            source = stored[name]
            if list(source.dims) == dims and _read(bundle_dir, source).tobytes() == _read(template_dir, tensor).tobytes():
                return {"kind": "float", "tensor": name, "transposed": False, "stored": source}
            if len(dims) == 2 and list(source.dims) == dims[::-1] and np.array_equal(_read(bundle_dir, source).T, _read(template_dir, tensor)):
                return {"kind": "float", "tensor": name, "transposed": True, "stored": source}
        if name in dequantizers:
            nodes = dequantizers[name]
            values = _dequantize(bundle_dir, nodes, stored)
            original = _read(template_dir, tensor).astype(np.float32)
            scale = max(float(np.linalg.norm(original)), 1e-12)
            errors = {}  # stored as the template has it, or transposed (a square weight could be either)
            if list(values.shape) == dims:
                errors[False] = float(np.linalg.norm(values - original)) / scale
            if len(dims) == 2 and list(values.shape) == dims[::-1]:
                errors[True] = float(np.linalg.norm(values.T - original)) / scale
            if not errors:
                continue
            transposed, error = min(errors.items(), key=lambda item: item[1])
            if error <= MAX_QUANTIZATION_ERROR:
                int4 = any(stored[node.input[0]].data_type in (21, 22) for node in nodes)  # UINT4, INT4
                int4 = int4 or any(attribute.name == "block_size" for node in nodes for attribute in node.attribute)  # opset 21 too
                return {"kind": "quantized", "tensor": name, "transposed": transposed, "nodes": nodes, "int4": int4,
                        "tensors": [stored[input_name] for node in nodes for input_name in node.input if input_name]}
    return None


# ---- the new template ---------------------------------------------------------------------------------


def _rewrite(model, matches: dict, layouts_before: dict, bundle_dir: Path, template_dir: Path) -> dict:
    """Rewire `model` to the matched stored tensors; unmatched initializers go to INFERENCE_TEMPLATE_DATA. Returns parameters."""
    import copy

    from onnx import helper

    graph = model.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    kept, added_nodes, removed_nodes, parameters, renames = [], [], set(), {}, {}
    with open(bundle_dir / INFERENCE_TEMPLATE_DATA, "wb") as own_data:
        for tensor in graph.initializer:
            name = tensor.name
            match = matches.get(name)
            record = {"initializer": name, "tensor": None, "file": INFERENCE_TEMPLATE_DATA}
            layout = layouts_before.get(name, "out_in")
            if match is None:
                if tensor.data_location == 1:
                    store_external(tensor, _raw(template_dir, tensor), own_data, INFERENCE_TEMPLATE_DATA)
                kept.append(tensor)
                parameters[name] = {**record, "value": name, "layout": layout}
                continue
            users = consumers.get(name, [])
            only_transposes = bool(users) and all(node.op_type == "Transpose" and _perm(node) in (None, [1, 0]) for node in users)
            record.update(tensor=match["tensor"], file=FROZEN_DATA if match["kind"] == "float" else QUANTIZED_DATA)
            if match["kind"] == "float":
                stored = copy.deepcopy(match["stored"])
                value = name if not match["transposed"] or only_transposes else name + "/stored"
                stored.name = value
                kept.append(stored)
            else:
                for source in match["tensors"]:
                    kept.append(copy.deepcopy(source))
                added_nodes.extend(copy.deepcopy(node) for node in match["nodes"])
                outputs = [node.output[0] for node in match["nodes"]]
                value = outputs[0]
                if len(outputs) > 1:
                    value = match["tensor"] + DEQUANTIZED_SUFFIX
                    added_nodes.append(helper.make_node("Concat", outputs, [value], axis=-1, name=f"ortft_dq/{match['tensor']}/Concat"))
                record["dequantize"] = [{"q": node.input[0], "scale": node.input[1], "zero_point": node.input[2] if len(node.input) > 2 and node.input[2] else None,
                                         **{attribute.name: attribute.i for attribute in node.attribute}} for node in match["nodes"]]
                if not match["transposed"]:
                    renames[name] = value  # the graph reads the dequantized tensor where it read the initializer
            if match["transposed"]:
                if only_transposes:  # MatMul(x, Transpose(W)) -> MatMul(x, W_t)
                    for transpose in users:
                        renames[transpose.output[0]] = value
                        removed_nodes.add(id(transpose))
                    layout = "in_out"
                else:
                    added_nodes.append(helper.make_node("Transpose", [value], [name], perm=[1, 0], name=f"ortft_shared/{name}/Transpose"))
                    value = name
            parameters[name] = {**record, "value": value, "layout": layout}
    nodes = [node for node in graph.node if id(node) not in removed_nodes]
    for node in nodes:
        for index, input_name in enumerate(node.input):
            if input_name in renames:
                node.input[index] = renames[input_name]
    del graph.node[:]
    graph.node.extend(added_nodes + nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    produced = {output for node in graph.node for output in node.output}
    kept_info = [value for value in graph.value_info if value.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    if not (bundle_dir / INFERENCE_TEMPLATE_DATA).stat().st_size:
        (bundle_dir / INFERENCE_TEMPLATE_DATA).unlink()
    return parameters


def _perm(node) -> list[int] | None:
    return next((list(attribute.ints) for attribute in node.attribute if attribute.name == "perm"), None)
