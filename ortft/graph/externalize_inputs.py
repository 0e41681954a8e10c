"""Give several graphs the same tensors as initializers stored once, in one external data file.

A QLoRA bundle's quantized weights are read by both the training and the eval graph. Inlined as
Constant nodes they were stored twice on disk, and every session first parsed them into a protobuf,
then copied them into its own tensors: a load-time peak of several copies (measured on a random
1.1B Llama, int8: 4.4 GB after load for 1.5 GB of frozen weights). As initializers whose bytes live in
one shared file (offsets aligned to 4 KiB) each graph file stays small and ORT reads the bytes
straight into its tensors.

The frozen float weights of every bundle travel the same way (frozen_weights.data), so that checkpoints
hold the trainable state only.

`write_external_tensors(tensors, path)` (or `write_external_blobs` for a stream of bytes) writes the
file once and returns the offsets;
`ExternalizeInputs(tensors, location, offsets)` turns the graph inputs of those names into
initializers that point into it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .base import GraphPass, PassResult

ALIGNMENT = 4096


def write_external_tensors(tensors: dict, path: Path) -> dict[str, tuple[int, int]]:
    """Write each TensorProto's raw bytes to `path` (aligned); returns name -> (offset, length)."""
    def raw_bytes():
        for name, tensor in tensors.items():
            if not tensor.HasField("raw_data"):
                raise ValueError(f"tensor {name} has no raw_data to store externally")
            yield name, tensor.raw_data

    return write_external_blobs(raw_bytes(), path)


def write_external_blobs(blobs: Iterable[tuple[str, bytes]], path: Path) -> dict[str, tuple[int, int]]:
    """Write each (name, bytes) to `path`, every start aligned to 4 KiB (ORT maps aligned data straight
    into its tensors); returns name -> (offset, length). `blobs` may be a generator: one at a time in memory."""
    offsets = {}
    with open(path, "wb") as handle:
        position = 0
        for name, data in blobs:
            padding = (-position) % ALIGNMENT
            handle.write(b"\0" * padding)
            position += padding
            handle.write(data)
            offsets[name] = (position, len(data))
            position += len(data)
    return offsets


class ExternalizeInputs(GraphPass):
    """Graph inputs named in `tensors` become initializers whose data is in `location` at `offsets`."""

    def __init__(self, tensors: dict, location: str, offsets: dict[str, tuple[int, int]]):
        self.tensors = tensors
        self.location = location
        self.offsets = offsets

    @property
    def name(self) -> str:
        return f"ExternalizeInputs[{self.location}]"  # a stage may store tensors in several files

    def call(self, model) -> PassResult:
        from onnx import TensorProto

        graph = model.graph
        found = [value.name for value in graph.input if value.name in self.tensors]
        if not found:
            return PassResult(model, False, 0)
        kept = [value for value in graph.input if value.name not in self.tensors]
        del graph.input[:]
        graph.input.extend(kept)
        for name in found:
            source = self.tensors[name]
            tensor = TensorProto()
            tensor.name = name
            tensor.data_type = source.data_type
            tensor.dims.extend(source.dims)
            tensor.data_location = TensorProto.EXTERNAL
            offset, length = self.offsets[name]
            for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            graph.initializer.append(tensor)
        return PassResult(model, True, len(found))
