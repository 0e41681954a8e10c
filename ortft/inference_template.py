"""The bundle's inference template (the base causal LM with KV cache) read without loading its weights.

Exports read base weights from their byte ranges (in the template's own data file, or in the bundle's
frozen_weights.data when the template shares the training graphs' weights) and write new models from
the template tensor by tensor, so at most one base weight is in memory besides the changed ones.
Device side: numpy and onnx only.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from .errors import BundleError

NUMPY_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64}
LARGE_TENSOR_BYTES = 1 << 16  # tensors from this size on start at a 4 KiB boundary of the data file (mappable)
PAGE = 4096
SMALL_ALIGNMENT = 64


class InferenceTemplate:
    """The template graph (`proto`, initializers by name) and where each base weight's bytes are."""

    def __init__(self, bundle_dir: Path, manifest: dict):
        import onnx

        section = manifest.get("inference")
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

    def initializer_of(self, hf_name: str):
        return self.initializers[self.section["weights"][hf_name]["initializer"]]

    def read(self, hf_name: str) -> np.ndarray:
        """The base weight of `hf_name` as stored in its initializer (layout from the manifest)."""
        tensor = self.initializer_of(hf_name)
        self.numpy_dtype(tensor)
        return self.array(tensor)

    def read_weights(self, hf_names) -> dict[str, np.ndarray]:
        return {name: self.read(name) for name in hf_names if name in self.section["weights"]}

    def files(self) -> list[Path]:
        """The template's model file and every file its initializers point into."""
        locations = {self.external(tensor)["location"] for tensor in self.initializers.values() if self.is_external(tensor)}
        return [self.model_path, *(self.model_path.parent / location for location in sorted(locations))]

    # ---- writing ----------------------------------------------------------------------------------

    def by_initializer(self, merged: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Merged weights keyed by initializer; a weight another layer also reads (a tied head) is refused."""
        consumers = consumer_counts(self.proto.graph, self.initializers)
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
        self.write_model(out_dir, copy.deepcopy(self.proto), self.by_initializer(merged), model_file, data_file)

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
