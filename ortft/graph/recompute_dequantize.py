"""Give the backward pass its own DequantizeLinear, so no layer's float32 weight lives from forward to backward.

In a training graph the dequantized weight of `MatMul(x, DQ(W))` is read twice: by the forward MatMul
and by the gradient MatMul that computes dL/dx. One shared DequantizeLinear output therefore stays
alive from the forward pass until the backward pass reaches that layer, so all layers' float32 copies
coexist at the peak. This pass clones each such DequantizeLinear for the backward consumers (same
quantized inputs, new output), so the forward copy dies after its MatMul and the backward copy is made
just before it is needed: the weight is dequantized twice per step, a compute-for-memory trade.

Backward nodes are the ones that depend, transitively, on a gradient tensor (a name ending in `_grad`,
as ORT's gradient builder names them).

Where the clone sits in the node list matters. ORT's default execution order is a depth-first walk
back from the graph's leaves that visits a node's producers in descending node index (node index =
position in the file). A clone placed just before its backward consumer has a higher index than the
gradient tensor's producer, so it was visited, and run, first: before the forward pass, which kept
every clone alive for the whole step (measured on SmolLM2 int4 at 1 x 128: the same peak RSS as
without recompute). Each clone therefore goes right after the forward DequantizeLinear it copies, at
the top of the graph: the walk then reaches it last among its consumer's producers and runs it just
before the gradient MatMul that reads it.
"""

from __future__ import annotations

from .base import GraphPass, PassResult

RECOMPUTE_SUFFIX = "_recompute"


def backward_nodes(nodes: list) -> set[int]:
    """Indices of the nodes downstream of any gradient tensor (`nodes` in topological order)."""
    gradient = set()
    found = set()
    for index, node in enumerate(nodes):
        if any(name.endswith("_grad") or name in gradient for name in node.input if name):
            found.add(index)
            gradient.update(node.output)
    return found


class RecomputeDequantize(GraphPass):
    def __init__(self, prefix: str | None = None):
        self.prefix = prefix  # only DequantizeLinear nodes whose name starts with it (None: all)

    def call(self, model) -> PassResult:
        graph = model.graph
        nodes = list(graph.node)
        backward = backward_nodes(nodes)
        consumers: dict[str, list[int]] = {}
        for index, node in enumerate(nodes):
            for name in node.input:
                consumers.setdefault(name, []).append(index)
        clones: dict[int, list] = {}  # index of the forward DequantizeLinear -> its clone, inserted right after it
        count = 0
        for index, node in enumerate(nodes):
            if node.op_type != "DequantizeLinear" or (self.prefix and not node.name.startswith(self.prefix)):
                continue
            if index in backward:
                continue
            users = consumers.get(node.output[0], [])
            late = [user for user in users if user in backward]
            if not late or len(late) == len(users):
                continue
            clone = type(node)()
            clone.CopyFrom(node)
            clone.name = node.name + RECOMPUTE_SUFFIX
            clone.output[0] = node.output[0] + RECOMPUTE_SUFFIX
            for user in late:
                for position, name in enumerate(nodes[user].input):
                    if name == node.output[0]:
                        nodes[user].input[position] = clone.output[0]
            clones.setdefault(index, []).append(clone)
            count += 1
        if not count:
            return PassResult(model, False, 0)
        ordered = []
        for index, node in enumerate(nodes):
            ordered.append(node)
            ordered.extend(clones.get(index, []))
        del graph.node[:]
        graph.node.extend(ordered)
        return PassResult(model, True, count)
