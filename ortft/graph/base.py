"""What every graph pass shares: the `GraphPass` shape (`call(model)` returns a PassResult saying what
changed) and the graph look-ups several passes need (producers, consumers, unused names)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PassResult:
    model: object  # onnx.ModelProto
    modified: bool
    count: int = 0
    details: dict = field(default_factory=dict)  # what a pass reports beyond its count (e.g. {op type: count})


def producers_of(graph) -> dict[str, object]:
    """Every tensor name a node writes -> that node (optional outputs left empty are not names)."""
    return {name: node for node in graph.node for name in node.output if name}


def consumers_of(graph) -> dict[str, list]:
    """Every tensor name -> the nodes that read it (a node reading it twice is listed twice)."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def names_in_use(graph) -> set[str]:
    """Every tensor and node name of `graph`: inputs, outputs, value_info, initializers, node inputs,
    outputs and names (what a new name must avoid)."""
    names = {value.name for value in list(graph.input) + list(graph.output) + list(graph.value_info)}
    names |= {tensor.name for tensor in graph.initializer}
    names |= {name for node in graph.node for name in list(node.input) + list(node.output)}
    names |= {node.name for node in graph.node}
    return names


def unique_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_1`, `base_2`, ... whichever is not in `taken`; the name is added to `taken`."""
    name, index = base, 0
    while name in taken:
        index += 1
        name = f"{base}_{index}"
    taken.add(name)
    return name


class GraphPass:
    """Base class: subclasses implement `call(model) -> PassResult`. `name` keys the pass's count in the
    manifest's `passes` record (ortft/graph/pipeline.py)."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def call(self, model) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, model) -> PassResult:
        return self.call(model)


FLOAT_BYTES = {1: 4, 10: 2, 16: 2, 11: 8}  # TensorProto FLOAT, FLOAT16, BFLOAT16, DOUBLE -> bytes per value


def is_float(tensor) -> bool:
    """Whether a TensorProto (an initializer) holds floating-point values."""
    return tensor.data_type in FLOAT_BYTES


def float_initializer_bytes(model, excluded: set[str]) -> int:
    """Bytes of the float initializers whose names are not in `excluded` (e.g. the trainable ones)."""
    import numpy as np

    return int(sum(FLOAT_BYTES[t.data_type] * int(np.prod(t.dims)) for t in model.graph.initializer
                   if t.name not in excluded and is_float(t)))
