"""The shape every graph pass has: `call(model)` returns a PassResult saying what changed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PassResult:
    model: object  # onnx.ModelProto
    modified: bool
    count: int = 0


def consumers_of(graph) -> dict[str, list]:
    """Every tensor name -> the nodes that read it (a node reading it twice is listed twice)."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


class GraphPass:
    """Base class: subclasses implement `call(model) -> PassResult`."""

    def call(self, model) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, model) -> PassResult:
        return self.call(model)
