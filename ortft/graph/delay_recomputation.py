"""Make each recomputation wait for the backward pass, so stock onnxruntime does not run it early.

The recompute passes (ortft/graph/recompute.py) clone forward results for the backward pass so the
forward copy can be freed early. A clone reads only forward tensors, so it can run as soon as those
exist. The training session runs ORT's PRIORITY_BASED order (ortft/runtime.py), a topological sort
that always takes the ready node of lowest index: a clone placed after the forward node it copies
runs right after that node, in the forward pass, and its output is kept until the backward reads it,
exactly what the recomputation was meant to avoid (SmolLM2 at 1 x 2048: every layer's act(gate),
act * up and normed inputs held at the peak).

The same holds for backward nodes that read only forward tensors: the lowered activation and norm
gradients' forward parts (sigmoid(x), x * inv_std) and the zeros an accumulator starts from.

This pass gives the first node of every such chain a data dependency on a gradient tensor that the
chain's backward consumer (or one a few nodes further on) reads anyway:

    x_late = Reshape(x, Shape(x) - (Size(g) - Size(g)))

Reshape to the same shape aliases x (no copy) and the integer ops are scalars; the clone now becomes
ready only when g exists, i.e. in the backward pass next to the node that reads it. SmolLM2 at 1 x 2048:
peak RSS 3718 -> 3302 MB with the clones delayed, 2480 MB with the forward-only backward nodes too.
"""

from __future__ import annotations

from .base import GraphPass, PassResult
from .recompute import RECOMPUTE_SUFFIX, backward_nodes

SEARCH_DEPTH = 4  # how many consumers past the clone to look for a gradient tensor
DELAY_PREFIX = "ortft_delay"
_SHAPE_OPS = frozenset({"Shape", "Size"})
_DELAYED_INPUT = {"DequantizeLinear": 1}  # which input waits: the float scale, not the int4/int8 weight


class DelayRecomputation(GraphPass):
    """Give every clone chain's first node a dependency on a backward tensor (module docstring); in place."""

    def call(self, model) -> PassResult:
        from onnx import helper

        graph = model.graph
        nodes = list(graph.node)
        backward = backward_nodes(nodes)
        clones = {index for index, node in enumerate(nodes) if node.name.endswith(RECOMPUTE_SUFFIX)}
        clone_outputs = {name for index in clones for name in nodes[index].output}
        producer = {name: index for index, node in enumerate(nodes) for name in node.output if name}
        consumers: dict[str, list[int]] = {}
        for index, node in enumerate(nodes):
            for name in set(node.input) | _subgraph_reads(node):
                consumers.setdefault(name, []).append(index)
        waits: dict[int, list[int]] = {}
        early = _forward_only_backward_nodes(nodes, backward, producer, clones)
        added: dict[int, list] = {}
        count = 0
        for index in sorted(clones | early):
            node = nodes[index]
            if any(name in clone_outputs for name in node.input) or node.name.startswith(DELAY_PREFIX):
                continue  # a later link of a chain waits for its first one
            position = _DELAYED_INPUT.get(node.op_type)
            if position is None:  # the first input a forward node makes
                position = next((at for at, name in enumerate(node.input) if name in producer), 0)
            if len(node.input) <= position or not node.input[position]:
                continue
            if node.input[position].startswith(DELAY_PREFIX):
                continue  # delayed by an earlier run of this pass
            gate = _gradient_tensor(index, nodes, consumers, producer, backward, clones, waits)
            if gate is None:
                continue
            prefix = f"{DELAY_PREFIX}{count}"
            waited = node.input[position]
            size = f"{prefix}/gradient_size"
            zero = f"{prefix}/zero"
            shape = f"{prefix}/shape"
            late_shape = f"{prefix}/late_shape"
            late = f"{prefix}/late"
            added[index] = [helper.make_node("Size", [gate], [size], name=size),
                            helper.make_node("Sub", [size, size], [zero], name=zero),
                            helper.make_node("Shape", [waited], [shape], name=shape),
                            helper.make_node("Sub", [shape, zero], [late_shape], name=late_shape),
                            helper.make_node("Reshape", [waited, late_shape], [late], name=late)]
            node.input[position] = late
            waits.setdefault(producer[gate], []).append(index)
            count += 1
        if not count:
            return PassResult(model, False, 0)
        ordered = []
        for index, node in enumerate(nodes):
            ordered.extend(added.get(index, []))
            ordered.append(node)
        del graph.node[:]
        graph.node.extend(_topological(ordered))
        return PassResult(model, True, count)


def _forward_only_backward_nodes(nodes: list, backward: set, producer: dict, clones: set) -> set:
    """Backward nodes (gradient-builder or lowering nodes, `_Grad/` in their names) that read only forward
    tensors: e.g. a lowered activation gradient's sigmoid(x) or a norm gradient's x * inv_std, or the zeros
    an accumulator starts from. Ready in the forward pass, they would run there and hold their outputs.
    Shape and Size nodes are left alone (their outputs are a few integers) and count as forward tensors."""
    early, shapes = set(), set()
    for index in sorted(backward):
        node = nodes[index]
        if index in clones or node.name.startswith(DELAY_PREFIX) or "_Grad/" not in node.name:
            continue
        sources = [producer[name] for name in node.input if name in producer]
        if not sources or any(source in backward and source not in shapes for source in sources):
            continue
        if node.op_type in _SHAPE_OPS:
            shapes.add(index)
        else:
            early.add(index)
    return early


def _gradient_tensor(clone: int, nodes: list, consumers: dict, producer: dict, backward: set, clones: set,
                     waits: dict) -> str | None:
    """A tensor that a backward node makes and that a node reached from `clone` within SEARCH_DEPTH
    consumer steps reads, and that does not itself depend on the clone (no cycle), counting the
    dependencies earlier delays added (`waits`: gradient producer -> the nodes now waiting for it)."""
    descendants, stack = {clone}, [clone]
    while stack:
        index = stack.pop()
        users = [user for name in nodes[index].output for user in consumers.get(name, [])] + waits.get(index, [])
        for user in users:
            if user not in descendants:
                descendants.add(user)
                stack.append(user)
    frontier = [clone]
    for _ in range(SEARCH_DEPTH):
        reached = [user for index in frontier for name in nodes[index].output for user in consumers.get(name, [])]
        for user in reached:
            if user in clones:
                continue
            for name in [*nodes[user].input, *sorted(_subgraph_reads(nodes[user]))]:  # a Loop reads gradients in its body
                source = producer.get(name)
                if source is not None and source in backward and source not in descendants and source not in clones:
                    return name
        frontier = reached
    return None


def _topological(nodes: list) -> list:
    """`nodes` in a topological order that keeps the given order where it can (lowest position first):
    a clone that now waits for a gradient moves after that gradient's producer."""
    import heapq

    producer = {name: position for position, node in enumerate(nodes) for name in node.output if name}
    waiting = [0] * len(nodes)
    users: dict[int, list[int]] = {}
    for position, node in enumerate(nodes):
        read = set(node.input) | _subgraph_reads(node)
        sources = {producer[name] for name in read if name in producer and producer[name] != position}
        waiting[position] = len(sources)
        for source in sources:
            users.setdefault(source, []).append(position)
    ready = [position for position, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        position = heapq.heappop(ready)
        ordered.append(nodes[position])
        for user in users.get(position, []):
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(ordered) != len(nodes):
        raise RuntimeError("DelayRecomputation made a cycle")  # _gradient_tensor excludes the clone's descendants
    return ordered


def _subgraph_reads(node) -> set:
    """Names the subgraphs of `node` (a Loop's body, say) read, outer-scope ones among them."""
    read = set()
    for attribute in node.attribute:
        for subgraph in ([attribute.g] if attribute.HasField("g") else list(attribute.graphs)):
            for inner in subgraph.node:
                read.update(inner.input)
                read |= _subgraph_reads(inner)
    return read
