"""Re-quantize the linear weights of a merged export (`ortft export --quantize int8|int4`).

The merged float32 weights (and the template's weights of linear layers no adapter touched) are
quantized round-to-nearest with the maths of `ortft/quantize.py`; the graph is rewritten so that
ONNX Runtime 1.19's CPU kernels run them:

- int4: each `MatMul(x, Transpose(W))` (or `MatMul(x, W)` for an [in, out] initializer) becomes one
  `com.microsoft.MatMulNBits(x, B, scales)`: symmetric int4 in blocks of `block_size` along the input
  dimension, stored as uint4 with the kernel's default zero point 8 (so no zero-point tensor),
  B packed [N, K/block, block/2] low nibble first, scales [N * K/block]. `accuracy_level=1`: float32
  activations (4 would quantize the activations to int8 and move the logits by ~1%).
  MatMulNBits needs no opset change: the template stays at its default opset.
- int8: `DequantizeLinear(q [in, out] int8, scale [out], axis=1)` in place of the Transpose (or in front
  of the MatMul): symmetric, one scale per output channel. ORT 1.19 has no 8-bit MatMulNBits on CPU,
  and runs the DequantizeLinear unfused (it does not constant-fold a DequantizeLinear).

A weight that is shared (a tied LM head reads the embedding table) or whose consumers do not fit the
patterns above stays float32 and is listed under `skipped`. The embedding table is never quantized.

The new model.onnx.data is written tensor by tensor in initializer order (bytes of untouched tensors
are copied from the template's data file), so at most one layer's weight is in memory besides the
merged ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import INT4_BLOCK_SIZE
from .errors import BundleError, ConfigError

SCHEMES = ("int8", "int4")
MATMULNBITS_ACCURACY_LEVEL = 1  # float32 activations (0 = unset also means float32 in ORT 1.19's CPU kernel)
MS_DOMAIN = "com.microsoft"
NODE_PREFIX = "ortft_q/"


def check_quantize_options(scheme: str | None, block_size: int | None) -> int | None:
    """Validate `--quantize` / `--block-size`; returns the block size to use (int4) or None."""
    if scheme is None:
        if block_size is not None:
            raise ConfigError("--block-size needs --quantize int4", hint="add --quantize int4, or drop --block-size")
        return None
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme {scheme!r}", hint=f"use one of: {', '.join(SCHEMES)}")
    if scheme == "int8":
        if block_size is not None:
            raise ConfigError("--block-size applies to --quantize int4 only (int8 has one scale per output channel)", hint="drop --block-size")
        return None
    block_size = INT4_BLOCK_SIZE if block_size is None else int(block_size)
    if block_size < 16 or block_size & (block_size - 1):
        raise ConfigError(f"--block-size {block_size} is not a power of two of at least 16 (MatMulNBits needs one)", hint=f"use {INT4_BLOCK_SIZE} (the default), 64 or 128")
    return block_size


def _consumers(graph) -> dict[str, list]:
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in set(node.input):
            consumers.setdefault(name, []).append(node)
    return consumers


def _is_plain_transpose(node) -> bool:
    perm = next((list(attr.ints) for attr in node.attribute if attr.name == "perm"), None)
    return node.op_type == "Transpose" and perm in (None, [1, 0])


def _matmul_b_only(value: str, users: list) -> bool:
    """Every consumer of `value` is a MatMul reading it as its B input (and only there)."""
    return bool(users) and all(node.op_type == "MatMul" and node.input[1] == value and node.input[0] != value for node in users)


class QuantizedExportWriter:
    """Rewrites a copy of the template graph and writes model.onnx + model.onnx.data into a folder."""

    def __init__(self, template, scheme: str, block_size: int | None):

        self.template = template
        self.scheme = scheme
        self.block_size = block_size
        self.proto = template.float_proto()  # dequantized base weights (QLoRA bundles) as float initializers
        self.layers: dict[str, dict] = {}
        self.skipped: dict[str, str] = {}

    # ---- planning ---------------------------------------------------------------------------------

    def plan(self) -> dict[str, dict]:
        """initializer name -> {hf_name, transpose (node or None), matmuls, layout} for every weight to quantize."""
        graph = self.proto.graph
        consumers = _consumers(graph)
        graph_outputs = {value.name for value in graph.output}
        by_initializer: dict[str, list[str]] = {}
        for hf_name, facts in self.template.section["weights"].items():
            by_initializer.setdefault(facts["initializer"], []).append(hf_name)
        initializers = {tensor.name: tensor for tensor in graph.initializer}
        plans = {}
        for initializer_name, hf_names in by_initializer.items():
            hf_name = hf_names[0]
            tensor = initializers.get(initializer_name)
            users = consumers.get(initializer_name, [])
            if tensor is None or tensor.data_type != 1 or len(tensor.dims) != 2:
                self.skipped[hf_name] = "not a float32 2-D initializer"
            elif len(hf_names) > 1 or len(users) > 1 or initializer_name in graph_outputs:
                self.skipped[hf_name] = "shares its initializer with another layer (tied embeddings): stays float32"
            elif len(users) == 1 and _is_plain_transpose(users[0]) and _matmul_b_only(users[0].output[0], consumers.get(users[0].output[0], [])):
                transpose = users[0]
                plans[initializer_name] = {"hf_name": hf_name, "transpose": transpose, "matmuls": consumers[transpose.output[0]], "kn": False}
            elif _matmul_b_only(initializer_name, users):
                plans[initializer_name] = {"hf_name": hf_name, "transpose": None, "matmuls": users, "kn": True}
            else:
                self.skipped[hf_name] = "not read as MatMul(x, W) or MatMul(x, Transpose(W)): stays float32"
        return plans

    # ---- writing ----------------------------------------------------------------------------------

    def write(self, out_dir: Path, merged: dict[str, np.ndarray], model_file: str, data_file: str) -> dict:
        """Write `out_dir/model_file` (+ `data_file`); return the export manifest's `quantization` section."""
        import onnx

        graph = self.proto.graph
        plans = self.plan()
        merged_by_initializer = {self.template.section["weights"][hf]["initializer"]: values for hf, values in merged.items()}
        new_initializers = []
        new_nodes: dict[str, list] = {}  # first output of a node to replace -> replacement nodes
        removed_nodes: set[str] = set()  # first outputs of nodes to drop
        with open(out_dir / data_file, "wb") as out:
            for tensor in list(graph.initializer):
                name = tensor.name
                plan = plans.get(name)
                if plan is not None:
                    weight = merged_by_initializer.get(name)
                    if weight is None:
                        weight = self.template.read(plan["hf_name"])
                    for new_tensor in self._quantize(name, plan, np.asarray(weight, dtype=np.float32), new_nodes, removed_nodes):
                        new_initializers.append(_store(new_tensor, out, data_file))
                    del weight
                    continue
                if name in merged_by_initializer:
                    values = np.ascontiguousarray(merged_by_initializer[name], dtype=self.template.numpy_dtype(tensor))
                    if list(values.shape) != list(tensor.dims):
                        raise BundleError(f"merged {name} has shape {list(values.shape)}, template has {list(tensor.dims)}")
                    data = values.tobytes()
                else:
                    data = self.template.raw_bytes(tensor)
                new_initializers.append(_store_bytes(tensor, data, out, data_file))
            out.flush()
        nodes = []
        for node in graph.node:
            key = node.output[0] if node.output else None
            if key in new_nodes:
                nodes.extend(_copy(replacement) for replacement in new_nodes[key])
            elif key not in removed_nodes:
                nodes.append(_copy(node))
        del graph.initializer[:]
        graph.initializer.extend(new_initializers)
        del graph.node[:]
        graph.node.extend(nodes)
        produced = {output for node in graph.node for output in node.output} | {t.name for t in graph.initializer} | {v.name for v in graph.input}
        kept_info = [_copy(value) for value in graph.value_info if value.name in produced]
        del graph.value_info[:]
        graph.value_info.extend(kept_info)
        if self.scheme == "int4" and not any(entry.domain == MS_DOMAIN for entry in self.proto.opset_import):
            self.proto.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
        (out_dir / model_file).write_bytes(self.proto.SerializeToString())
        return self.section()

    def _quantize(self, name: str, plan: dict, weight: np.ndarray, new_nodes: dict, removed_nodes: set) -> list:
        from .quantize import error_stats, quantize

        # the [out, in] view (N x K) of the weight MatMul multiplies by
        w_nk = weight.T if plan["kn"] else weight
        n, k = w_nk.shape
        prefix = NODE_PREFIX + name
        if self.scheme == "int8":
            w_kn = np.ascontiguousarray(w_nk.T)
            quantized = quantize(w_kn, "int8", axis=0)  # one scale per output column
            tensors = [_array_tensor(quantized.q, name + "_q"), _array_tensor(quantized.scale, name + "_scale")]
            from onnx import helper

            if plan["transpose"] is not None:
                transpose = plan["transpose"]
                dq = helper.make_node("DequantizeLinear", [t.name for t in tensors], [transpose.output[0]], name=prefix + "/DequantizeLinear", axis=1)
                new_nodes[transpose.output[0]] = [dq]
            else:
                dq_out = name + "_dequantized"
                dq = helper.make_node("DequantizeLinear", [t.name for t in tensors], [dq_out], name=prefix + "/DequantizeLinear", axis=1)
                first = plan["matmuls"][0]
                for node in plan["matmuls"]:
                    node.input[1] = dq_out
                new_nodes[first.output[0]] = [dq, first]
            stored_bytes = quantized.q.nbytes + quantized.scale.nbytes
        else:
            from onnx import helper

            from .quantize import pack_int4

            block = self.block_size
            quantized = quantize(w_nk, "int4", axis=1, block_size=block, symmetric=True)  # scale [N, blocks]
            blocks = quantized.scale.shape[1]
            codes = np.zeros((n, blocks * block), np.uint8)
            codes[:, :k] = (quantized.q.astype(np.int16) + 8).astype(np.uint8)  # padding codes 8 = value 0
            packed = np.frombuffer(pack_int4(codes), np.uint8).reshape(n, blocks, block // 2)
            tensors = [_array_tensor(packed, name + "_q4"), _array_tensor(quantized.scale.reshape(-1), name + "_scales")]
            for index, matmul in enumerate(plan["matmuls"]):
                replacement = helper.make_node(
                    "MatMulNBits", [matmul.input[0], tensors[0].name, tensors[1].name], list(matmul.output),
                    name=f"{prefix}/MatMulNBits" + (f"_{index}" if index else ""), domain=MS_DOMAIN,
                    K=k, N=n, bits=4, block_size=block, accuracy_level=MATMULNBITS_ACCURACY_LEVEL,
                )
                new_nodes[matmul.output[0]] = [replacement]
            if plan["transpose"] is not None:
                removed_nodes.add(plan["transpose"].output[0])
            stored_bytes = packed.nbytes + quantized.scale.nbytes
        self.layers[plan["hf_name"]] = {
            "initializer": name,
            "shape": list(weight.shape),
            "op": "DequantizeLinear+MatMul" if self.scheme == "int8" else "MatMulNBits",
            "bytes_before": int(weight.nbytes),
            "bytes_after": int(stored_bytes),
            **error_stats(w_nk.T if self.scheme == "int8" else w_nk, quantized),
        }
        return tensors

    def section(self) -> dict:
        before = sum(layer["bytes_before"] for layer in self.layers.values())
        after = sum(layer["bytes_after"] for layer in self.layers.values())
        section = {
            "scheme": self.scheme,
            "symmetric": True,
            "block_size": self.block_size,
            "op": "MatMulNBits" if self.scheme == "int4" else "DequantizeLinear+MatMul",
            "quantized_layers": len(self.layers),
            "bytes_before": before,
            "bytes_after": after,
            "max_rel_error": max((layer["max_rel_error"] for layer in self.layers.values()), default=0.0),
            "layers": self.layers,
            "skipped": self.skipped,
        }
        if self.scheme == "int4":
            section["accuracy_level"] = MATMULNBITS_ACCURACY_LEVEL
        else:
            section["axis"] = "per output channel"
        return section


def _array_tensor(values: np.ndarray, name: str):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(values), name)


def _store(tensor, out, data_file: str):
    """Move a TensorProto's raw data into the data file; returns the tensor, now external."""
    return _store_bytes(tensor, tensor.raw_data, out, data_file)


def _copy(message):
    copied = type(message)()
    copied.CopyFrom(message)
    return copied


def _store_bytes(tensor, data: bytes, out, data_file: str):
    """Append `data` to the data file (aligned); returns a copy of `tensor` pointing at it."""
    from .inference_template import store_external

    tensor = _copy(tensor)
    store_external(tensor, data, out, data_file)
    return tensor
