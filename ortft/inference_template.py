"""The bundle's inference template (the base causal LM with KV cache) read without loading its weights.

Exports read base weights from their byte ranges (in the template's own data file, or in the bundle's
frozen_weights.data / quantized_weights.data when the template shares the training graphs' weights,
ortft/prepare/shared_weights.py) and write new models from the template tensor by tensor, so at most
one base weight is in memory besides the changed ones. A weight the template dequantizes (QLoRA
bundles) reads as its dequantized values: that is the base the adapters were trained against, and
`float_proto()` is the template with those values as (lazily computed) float initializers, which
merged exports write. Device side: numpy and onnx only.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from .bundle import BundleManifest
from .errors import BundleError

NUMPY_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64}
INT4, UINT4 = 22, 21  # ONNX data types
LAZY_LOCATION = "ortft-dequantized:"  # float_proto(): an initializer computed from the parameter of that name
# ONNX Runtime (1.32) fuses DequantizeLinear + MatMul into MatMulNBits and by default (accuracy level 4) also
# quantizes the activations; level 1 keeps them float32: the template then computes exactly the dequantized base.
DEQUANTIZE_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}


def template_session_config(manifest: dict) -> dict[str, str]:
    """ONNX Runtime session settings a bundle's template (or a graph made from it) needs: a QLoRA bundle's
    template dequantizes its weights in the graph."""
    parameters = (BundleManifest.of(manifest).inference or {}).get("parameters") or {}
    return dict(DEQUANTIZE_SESSION_CONFIG) if any(record.get("dequantize") for record in parameters.values()) else {}
LARGE_TENSOR_BYTES = 1 << 16  # tensors from this size on start at a 4 KiB boundary of the data file (mappable)
PAGE = 4096
SMALL_ALIGNMENT = 64


class InferenceTemplate:
    """The template graph (`proto`, initializers by name) and where each base weight's bytes are."""

    def __init__(self, bundle_dir: Path, manifest: dict):
        import onnx

        section = BundleManifest.of(manifest).inference
        if not section:
            raise BundleError(f"bundle {bundle_dir} has no inference template", hint="prepare it again with the inference template on (causal-lm only)")
        self.bundle_dir = Path(bundle_dir)
        self.section = section
        self.model_path = self.bundle_dir / section["model"]
        if not self.model_path.is_file():
            raise BundleError(f"{self.model_path} is missing", hint="prepare the bundle again or copy it anew")
        self.proto = onnx.load(str(self.model_path), load_external_data=False)
        self.initializers = {tensor.name: tensor for tensor in self.proto.graph.initializer}

    # ---- reading ----------------------------------------------------------------------------------

    @staticmethod
    def is_external(tensor) -> bool:
        import onnx

        return tensor.data_location == onnx.TensorProto.EXTERNAL

    @staticmethod
    def external(tensor) -> dict:
        return {entry.key: entry.value for entry in tensor.external_data}

    def numpy_dtype(self, tensor):
        dtype = NUMPY_DTYPES.get(tensor.data_type)
        if dtype is None:
            raise BundleError(f"initializer {tensor.name} has ONNX data type {tensor.data_type}, which export cannot merge into",
                              hint="prepare the bundle in float32 or float16")
        return dtype

    def raw_bytes(self, tensor) -> bytes:
        """The stored bytes of an initializer (external or inline), as ONNX keeps them (little-endian)."""
        from onnx import numpy_helper

        if not self.is_external(tensor):
            return tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
        facts = self.external(tensor)
        if facts["location"].startswith(LAZY_LOCATION):
            return np.ascontiguousarray(self.read_value(tensor.name), dtype=np.float32).tobytes()
        length = int(facts["length"]) if "length" in facts else byte_size(tensor)
        path = self.model_path.parent / facts["location"]
        with open(path, "rb") as handle:
            handle.seek(int(facts.get("offset", 0)))
            data = handle.read(length)
        if len(data) != length:
            raise BundleError(f"{path} is shorter than {self.model_path.name} says", hint="prepare the bundle again or copy it anew")
        return data

    def array(self, tensor) -> np.ndarray:
        from onnx import helper

        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return np.frombuffer(self.raw_bytes(tensor), dtype=dtype).reshape(list(tensor.dims))

    def parameters(self) -> dict[str, dict]:
        """Hugging Face parameter name -> {value (the graph value holding it), layout, dequantize (optional)}.

        Recorded by prepare (`inference.parameters`); a template made before holds every parameter as an
        initializer of that name.
        """
        recorded = self.section.get("parameters")
        if recorded:
            return recorded
        layouts = {facts["initializer"]: facts["layout"] for facts in self.section["weights"].values()}
        return {tensor.name: {"value": tensor.name, "layout": layouts.get(tensor.name, "out_in")} for tensor in self.proto.graph.initializer}

    def _by_value(self) -> dict[str, tuple[str, dict]]:
        if not hasattr(self, "_value_index"):
            self._value_index = {record["value"]: (name, record) for name, record in self.parameters().items()}
        return self._value_index

    def read_value(self, value: str) -> np.ndarray:
        """The float values of a graph value holding a weight: an initializer, or a dequantized weight."""
        _name, record = self._by_value().get(value, (None, {}))
        if record.get("dequantize"):
            parts = [dequantize_linear(*(self._raw_tensor(part[key]) if part.get(key) else None for key in ("q", "scale", "zero_point")),
                                       part.get("axis", 1), part.get("block_size", 0)) for part in record["dequantize"]]
            return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
        tensor = self.initializers[value]
        self.numpy_dtype(tensor)
        return self.array(tensor)

    def _raw_tensor(self, name: str) -> tuple[int, list[int], bytes]:
        tensor = self.initializers[name]
        return tensor.data_type, list(tensor.dims), self.raw_bytes(tensor)

    def read(self, hf_name: str) -> np.ndarray:
        """The base weight of a linear layer `hf_name` as stored (layout from the manifest's `weights`)."""
        return self.read_value(self.section["weights"][hf_name]["initializer"])

    def read_parameter(self, hf_name: str) -> np.ndarray:
        """Any parameter (norms and embeddings too) in Hugging Face's layout ([out, in] for a linear weight)."""
        record = self.parameters()[hf_name]
        values = self.read_value(record["value"])
        return values.T if record["layout"] == "in_out" else values

    def read_weights(self, hf_names) -> dict[str, np.ndarray]:
        return {name: self.read(name) for name in hf_names if name in self.section["weights"]}

    def float_proto(self):
        """A copy of the template graph in which each dequantized weight is a float initializer again (its
        DequantizeLinear nodes and quantized tensors gone); those initializers' bytes are computed when read."""
        import onnx

        proto = copy.deepcopy(self.proto)
        dequantized = {record["value"]: (name, record) for name, record in self.parameters().items() if record.get("dequantize")}
        if not dequantized:
            return proto
        graph = proto.graph
        producers = {output: node for node in graph.node for output in node.output}
        dropped_nodes, dropped_tensors = set(), set()
        for value, (name, record) in dequantized.items():
            pending = [value]
            while pending:  # the DequantizeLinear nodes (and a Concat of column parts) that make `value`
                node = producers.get(pending.pop())
                if node is None or id(node) in dropped_nodes:
                    continue
                dropped_nodes.add(id(node))
                for input_name in node.input:
                    if input_name in self.initializers:
                        dropped_tensors.add(input_name)
                    elif input_name:
                        pending.append(input_name)
            tensor = onnx.TensorProto()
            tensor.name, tensor.data_type = value, onnx.TensorProto.FLOAT
            tensor.dims.extend(self.dequantized_dims(record))
            tensor.data_location = onnx.TensorProto.EXTERNAL
            entry = tensor.external_data.add()
            entry.key, entry.value = "location", LAZY_LOCATION + name
            graph.initializer.append(tensor)
        nodes = [node for node in graph.node if id(node) not in dropped_nodes]
        del graph.node[:]
        graph.node.extend(nodes)
        tensors = [tensor for tensor in graph.initializer if tensor.name not in dropped_tensors]
        del graph.initializer[:]
        graph.initializer.extend(tensors)
        return proto

    def dequantized_dims(self, record: dict) -> list[int]:
        shapes = [list(self.initializers[part["q"]].dims) for part in record["dequantize"]]
        return [*shapes[0][:-1], sum(shape[-1] for shape in shapes)]

    def files(self) -> list[Path]:
        """The template's model file and every file its initializers point into."""
        locations = {self.external(tensor)["location"] for tensor in self.initializers.values() if self.is_external(tensor)}
        locations = {location for location in locations if not location.startswith(LAZY_LOCATION)}
        return [self.model_path, *(self.model_path.parent / location for location in sorted(locations))]

    # ---- writing ----------------------------------------------------------------------------------

    def by_initializer(self, merged: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Merged weights keyed by initializer; a weight another layer also reads (a tied head) is refused."""
        float_graph = self.float_proto().graph
        consumers = consumer_counts(float_graph, {tensor.name for tensor in float_graph.initializer})
        by_initializer: dict[str, np.ndarray] = {}
        for hf_name, values in merged.items():
            initializer_name = self.section["weights"][hf_name]["initializer"]
            sharing = [name for name, facts in self.section["weights"].items() if facts["initializer"] == initializer_name and name != hf_name]
            if sharing or consumers.get(initializer_name, 0) > 1:
                raise BundleError(
                    f"{hf_name} shares its weights ({initializer_name}) with another layer (tied embeddings?); "
                    "a merged export cannot change one without the other",
                    hint="export with --format peft or --format adapter instead",
                )
            by_initializer[initializer_name] = values
        return by_initializer

    def write_merged(self, out_dir: Path, merged: dict[str, np.ndarray], model_file: str = "model.onnx",
                     data_file: str = "model.onnx.data") -> None:
        """Write `out_dir/model_file` (+ `data_file`): the template with the `merged` weights in place."""
        self.write_model(out_dir, self.float_proto(), self.by_initializer(merged), model_file, data_file)

    def write_model(self, out_dir: Path, proto, replacements: dict[str, np.ndarray], model_file: str, data_file: str) -> None:
        """Write `proto` (the template graph or a rewrite of it) with every initializer's bytes in one data file.

        An initializer named in `replacements` gets those values (same shape); any other keeps the
        template's bytes; initializers the rewrite added inline (not in the template) are stored too.
        Tensors are copied one at a time.
        """
        with open(Path(out_dir) / data_file, "wb") as out:
            for tensor in proto.graph.initializer:
                if tensor.name in replacements:
                    values = np.ascontiguousarray(replacements[tensor.name], dtype=self.numpy_dtype(tensor))
                    if list(values.shape) != list(tensor.dims):
                        raise BundleError(f"new {tensor.name} has shape {list(values.shape)}, template has {list(tensor.dims)}")
                    data = values.tobytes()
                else:
                    data = self.raw_bytes(tensor)  # external: a location relative to the template's folder
                store_external(tensor, data, out, data_file)
            out.flush()
        (Path(out_dir) / model_file).write_bytes(proto.SerializeToString())


def consumer_counts(graph, initializers) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.node:
        for name in set(node.input):
            if name in initializers:
                counts[name] = counts.get(name, 0) + 1
    return counts


def byte_size(tensor) -> int:
    from onnx import helper

    count = int(np.prod(list(tensor.dims))) if tensor.dims else 1
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def store_external(tensor, data: bytes, out, data_file: str) -> None:
    """Append `data` to the open data file `out` (aligned) and point `tensor` (modified in place) at it."""
    import onnx

    position = out.tell()
    alignment = PAGE if len(data) >= LARGE_TENSOR_BYTES else SMALL_ALIGNMENT
    padding = (-position) % alignment
    if padding:
        out.write(b"\0" * padding)
        position += padding
    out.write(data)
    tensor.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    for key, value in (("location", data_file), ("offset", str(position)), ("length", str(len(data)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def tensor_values(data_type: int, dims: list[int], raw: bytes) -> np.ndarray:
    """A tensor's values from its raw bytes (int4/uint4 unpacked)."""
    from onnx import helper

    count = int(np.prod(dims)) if dims else 1
    if data_type in (INT4, UINT4):
        from .quantize import unpack_int4

        return unpack_int4(raw, count, signed=data_type == INT4).reshape(dims)
    return np.frombuffer(raw, dtype=helper.tensor_dtype_to_np_dtype(data_type)).reshape(dims)


def dequantize_linear(q: tuple, scale: tuple, zero_point: tuple | None, axis: int, block_size: int) -> np.ndarray:
    """ONNX DequantizeLinear in numpy: (q - zero_point) * scale, per tensor, per axis or blocked along `axis`.
    Each tensor is given as (ONNX data type, dims, raw bytes)."""
    values = tensor_values(*q).astype(np.float32)
    scales = tensor_values(*scale).astype(np.float32)
    zero = tensor_values(*zero_point).astype(np.float32) if zero_point is not None else np.zeros_like(scales)
    axis = axis % values.ndim
    if scales.ndim == 0:
        return (values - zero) * scales
    if block_size:
        length = values.shape[axis]
        scales = np.repeat(scales, block_size, axis=axis).take(np.arange(length), axis=axis)
        zero = np.repeat(zero, block_size, axis=axis).take(np.arange(length), axis=axis)
        return (values - zero) * scales
    shape = [1] * values.ndim
    shape[axis] = -1
    return (values - zero.reshape(shape)) * scales.reshape(shape)
