"""Recompute chosen forward results in the backward pass instead of keeping them alive until it.

A training graph keeps every forward tensor that a gradient node reads until that node runs: for the
first layers, from the start of the forward pass to the end of the backward pass. When such a tensor is
cheap to compute again from tensors the backward keeps anyway, a clone of its producer can give the
backward its own copy, made just before it is read, and the forward copy dies as soon as the forward
pass is done with it. Two uses:

- `RecomputeDequantize`: the float32 weight a DequantizeLinear makes from quantized weights (inputs are
  initializers, always there); see ortft/graph/recompute_dequantize.py.
- `RecomputeActivations` (recompute_activations.py): cheap elementwise results, e.g. a SwiGLU MLP's act = QuickGelu(gate) and
  act * up, whose inputs gate and up the backward keeps anyway (QuickGeluGrad reads gate, MulGrad reads
  up): two [tokens, intermediate] tensors per layer fewer at the peak, for one elementwise pass each.
- `RecomputeNorms` (recompute_norms.py): the output of an RMS norm that adapters read, as x * inv_std * scale from the
  input and inverse standard deviation the norm's own gradient keeps anyway; the LoRA A gradient
  (dA = dH^T x) is its only backward reader. Two [tokens, hidden] tensors per decoder layer fewer at the
  peak, for two elementwise passes each.

Backward nodes are the ones that depend, transitively, on a gradient tensor (a name ending in `_grad`,
as ORT's gradient builder names them) or that the gradient builder made (`..._Grad/...` node names). A clone's inputs must be kept for the backward anyway, be
constants or graph inputs, or be the outputs of earlier clones (chains: act's clone feeds the clone
of act * up).

Where a clone sits in the node list matters. ORT's default execution order is a depth-first walk
back from the graph's leaves that visits a node's producers in descending node index (node index =
position in the file). A clone placed just before its backward consumer has a higher index than the
gradient tensor's producer, so it was visited, and run, first: before the forward pass, which kept
every clone alive for the whole step (measured on SmolLM2 int4 at 1 x 128: the same peak RSS as
without recompute). Each clone therefore goes right after the forward node it copies, at the top of
the graph: the walk then reaches it last among its consumer's producers and runs it just before the
backward node that reads it.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import GraphPass, PassResult

RECOMPUTE_SUFFIX = "_recompute"


def backward_nodes(nodes: list) -> set[int]:
    """Indices of the backward pass's nodes (`nodes` in topological order).

    Downstream of a gradient tensor, or made by ORT's gradient builder (named `<forward node>_Grad/...`):
    some of those read only forward tensors, e.g. MatMul_Grad's Reshape of the input it needs for the
    weight gradient, and run in the backward pass all the same.
    """
    gradient = set()
    found = set()
    for index, node in enumerate(nodes):
        if "_Grad/" in node.name or any(name.endswith("_grad") or name in gradient for name in node.input if name):
            found.add(index)
            gradient.update(node.output)
    return found


class RecomputeForBackward(GraphPass):
    """Clone every forward node `chosen(node)` accepts for the backward nodes reading its (single) output.

    Subclasses may recompute the output another way: `recompute_inputs` names what the recomputation
    reads and `build` makes its nodes (the last one writes `output`).
    """

    def __init__(self, chosen: Callable[[object], bool]):
        self.chosen = chosen

    def recompute_inputs(self, node) -> list[str] | None:
        """What recomputing `node`'s first output reads; None: not recomputable."""
        return list(node.input) if len(node.output) == 1 else None

    def build(self, node, inputs: list[str], output: str) -> list:
        """Nodes that compute `output` from `inputs` (as `recompute_inputs` named them, clones substituted)."""
        clone = type(node)()
        clone.CopyFrom(node)
        clone.name = (node.name or node.output[0]) + RECOMPUTE_SUFFIX
        del clone.input[:]
        clone.input.extend(inputs)
        clone.output[0] = output
        return [clone]

    def call(self, model) -> PassResult:
        graph = model.graph
        nodes = list(graph.node)
        backward = backward_nodes(nodes)
        backward |= {index for index, node in enumerate(nodes) if node.name.endswith(RECOMPUTE_SUFFIX)}  # earlier clones
        always_there = {tensor.name for tensor in graph.initializer} | {value.name for value in graph.input}
        always_there |= {node.output[0] for node in nodes if node.op_type == "Constant"}
        consumers: dict[str, list[int]] = {}
        backward_reads: dict[str, int] = {}  # tensor -> how many backward nodes read it now
        for index, node in enumerate(nodes):
            for name in node.input:
                consumers.setdefault(name, []).append(index)
                if index in backward:
                    backward_reads[name] = backward_reads.get(name, 0) + 1
        recomputed = {node.output[0].removesuffix(RECOMPUTE_SUFFIX): node.output[0]  # forward output -> its clone's
                      for node in nodes if node.name.endswith(RECOMPUTE_SUFFIX) and node.output[0].endswith(RECOMPUTE_SUFFIX)}
        earlier = len(recomputed)
        clones: dict[int, list] = {}  # index of the forward node -> its recomputation, inserted right after it
        for index, node in enumerate(nodes):
            if index in backward or not node.output or not self.chosen(node):
                continue
            inputs = self.recompute_inputs(node)
            if inputs is None:
                continue
            users = consumers.get(node.output[0], [])
            late = [user for user in users if user in backward]
            if not late or len(late) == len(users):
                continue
            if not all(name in recomputed or name in always_there or backward_reads.get(name, 0) for name in inputs if name):
                continue  # recomputing would keep an input alive that the backward does not need
            output = node.output[0] + RECOMPUTE_SUFFIX
            inputs = [recomputed.get(name, name) for name in inputs]
            built = self.build(node, inputs, output)
            for user in late:
                for position, name in enumerate(nodes[user].input):
                    if name == node.output[0]:
                        nodes[user].input[position] = output
            backward_reads[node.output[0]] = 0
            for name in inputs:
                backward_reads[name] = backward_reads.get(name, 0) + 1
            recomputed[node.output[0]] = output
            clones.setdefault(index, []).extend(built)
        if len(recomputed) == earlier:
            return PassResult(model, False, 0)
        ordered = []
        for index, node in enumerate(nodes):
            ordered.append(node)
            ordered.extend(clones.get(index, []))
        del graph.node[:]
        graph.node.extend(ordered)
        return PassResult(model, True, len(recomputed) - earlier)
