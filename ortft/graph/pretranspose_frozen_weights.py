"""Store frozen 2-D weights already transposed, so the training graph stops transposing them every step.

torch exports `x @ W.T` as MatMul(x, Transpose(W)). W is a frozen parameter (a graph input of the
training session, so ORT cannot constant-fold the Transpose): every step would transpose every base
weight and keep the copies alive for the backward pass. For a frozen initializer whose only consumers
are Transpose(perm=[1, 0]) nodes, this pass writes W.T into the initializer and wires the consumers of
those Transposes straight to it. Trainable tensors are never touched (their layout is the PEFT contract).
"""

from __future__ import annotations

from .base import GraphPass, PassResult, consumers_of


class PretransposeFrozenWeights(GraphPass):
    def __init__(self, trainable: set[str]):
        self.trainable = set(trainable)

    def call(self, model) -> PassResult:
        from onnx import numpy_helper

        graph = model.graph
        consumers = consumers_of(graph)
        graph_outputs = {value.name for value in graph.output}
        count = 0
        removed = set()
        for initializer in graph.initializer:
            name = initializer.name
            users = consumers.get(name, [])
            if name in self.trainable or len(initializer.dims) != 2 or not users or name in graph_outputs:
                continue
            if not all(node.op_type == "Transpose" and _perm(node) in (None, [1, 0]) for node in users):
                continue
            if any(out in graph_outputs for node in users for out in node.output):
                continue
            array = numpy_helper.to_array(initializer)
            initializer.CopyFrom(numpy_helper.from_array(array.T.copy(), name))
            for transpose in users:
                _rewire(graph, transpose.output[0], name)
                removed.add(id(transpose))
            count += 1
        if removed:
            kept = [node for node in graph.node if id(node) not in removed]
            del graph.node[:]
            graph.node.extend(kept)
        return PassResult(model, count > 0, count)


def _perm(node) -> list[int] | None:
    for attribute in node.attribute:
        if attribute.name == "perm":
            return list(attribute.ints)
    return None


def _rewire(graph, old: str, new: str) -> None:
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new
