"""Split a bundle's graphs at the hidden state that enters the first adapted layer (the frozen-prefix cache).

With adapters only in the last layers, the hidden state entering the first adapted layer depends on the
input tokens and frozen weights alone. `split_prefix` cuts the bundle's finished (lowered) graphs there:
- the prefix graph: the eval graph's nodes that compute that hidden state from the batch (embeddings and
  frozen layers, forward only), with it as the output `hidden_states`;
- the suffix training and eval graphs: the bundle's graphs with that tensor turned into the input
  `hidden_states` and every node that only fed it removed.
The three graphs are the same nodes as the bundle's own (the same ops on the same values, so the same
losses), and their initializers point into the same weight files: no weight is stored twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HIDDEN_STATES = "hidden_states"  # the prefix graph's output and the suffix graphs' input


@dataclass
class PrefixSplit:
    """What `split_prefix` made: the three graphs and the name of the tensor cut."""

    prefix: object  # onnx.ModelProto
    suffix_training: object
    suffix_eval: object
    boundary: str  # the bundle graphs' name of the hidden state entering layer `first_adapted_layer`
    prefix_nodes: int
    suffix_training_nodes_removed: int


def _layer_scope(index: int):
    return re.compile(rf"(^|/)layers\.{index}/")


def boundary_tensor(graph, first_adapted_layer: int) -> str | None:
    """The tensor that nodes of layer `first_adapted_layer` read from nodes of the layer before it:
    the residual stream entering the first adapted layer (torch's exporter names nodes by module scope,
    `/model/layers.N/...`). None if there is not exactly one."""
    inside, before = _layer_scope(first_adapted_layer), _layer_scope(first_adapted_layer - 1)
    producer = {name: node for node in graph.node for name in node.output}
    found = set()
    for node in graph.node:
        if not inside.search(node.name):
            continue
        for name in node.input:
            source = producer.get(name)
            if source is not None and before.search(source.name):
                found.add(name)
    return found.pop() if len(found) == 1 else None


def _names_read(node) -> set[str]:
    """Every tensor a node reads, including outer-scope names its subgraphs (Loop, If, Scan bodies) read."""
    names = {name for name in node.input if name}
    for attribute in node.attribute:
        for body in list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else []):
            local = {value.name for value in body.input} | {tensor.name for tensor in body.initializer}
            for inner in body.node:
                local.update(inner.output)
            for inner in body.node:
                names.update(name for name in _names_read(inner) if name not in local)
    return names


def _live_nodes(graph, wanted: set[str], available: set[str]) -> list:
    """The nodes (in graph order) needed to compute `wanted`, taking the tensors in `available` as given."""
    producer = {name: index for index, node in enumerate(graph.node) for name in node.output}
    live: set[int] = set()
    pending = [name for name in wanted if name not in available]
    seen = set(pending)
    while pending:
        index = producer.get(pending.pop())
        if index is None or index in live:
            continue
        live.add(index)
        for name in _names_read(graph.node[index]):
            if name not in seen and name not in available:
                seen.add(name)
                pending.append(name)
    return [node for index, node in enumerate(graph.node) if index in live]


def _rebuild(model, nodes: list, outputs: list, extra_inputs: list):
    """A copy of `model` with only `nodes`, the given outputs, the graph inputs and initializers the
    nodes read, and `extra_inputs` (value infos) in front."""
    import onnx

    graph = model.graph
    read: set[str] = set()
    for node in nodes:
        read |= _names_read(node)
    read |= {value.name for value in outputs}
    new = onnx.helper.make_graph(
        nodes=[onnx.NodeProto.FromString(node.SerializeToString()) for node in nodes],
        name=graph.name,
        inputs=list(extra_inputs) + [value for value in graph.input if value.name in read],
        outputs=outputs,
        initializer=[tensor for tensor in graph.initializer if tensor.name in read],
        value_info=[value for value in graph.value_info if value.name in read],
    )
    result = onnx.helper.make_model(new, opset_imports=list(model.opset_import), producer_name="ortft prefix split")
    result.ir_version = model.ir_version
    for function in model.functions:
        result.functions.append(function)
    return result


def _rename_input(nodes: list, old: str, new: str) -> None:
    for node in nodes:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new
        for attribute in node.attribute:
            for body in list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else []):
                _rename_input(list(body.node), old, new)


def _hidden_value(name: str, hidden_size: int):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "sequence", hidden_size])


def suffix_graph(model, boundary: str, hidden_size: int, trainable: set[str]):
    """`model` with `boundary` as the input `hidden_states`, without the nodes that only fed it."""
    graph = model.graph
    nodes = _live_nodes(graph, {value.name for value in graph.output}, {boundary})
    copy = _rebuild(model, nodes, list(graph.output), [_hidden_value(HIDDEN_STATES, hidden_size)])
    _rename_input(list(copy.graph.node), boundary, HIDDEN_STATES)
    kept = {value.name for value in copy.graph.input}
    lost = trainable - kept
    if lost:
        raise RuntimeError(f"the suffix graph lost trainable inputs: {sorted(lost)[:3]}")
    return copy


def prefix_graph(eval_model, boundary: str, hidden_size: int, trainable: set[str]):
    """The eval graph's nodes that compute `boundary`, with it as the output `hidden_states`."""
    from onnx import helper

    graph = eval_model.graph
    nodes = _live_nodes(graph, {boundary}, set())
    nodes.append(helper.make_node("Identity", [boundary], [HIDDEN_STATES], name="prefix_hidden_states"))
    copy = _rebuild(eval_model, nodes, [_hidden_value(HIDDEN_STATES, hidden_size)], [])
    read_trainable = trainable & {value.name for value in copy.graph.input}
    if read_trainable:
        raise RuntimeError(f"the frozen prefix reads trainable tensors: {sorted(read_trainable)[:3]}")
    return copy


def split_prefix(training_model, eval_model, first_adapted_layer: int, hidden_size: int,
                 trainable: set[str]) -> PrefixSplit | None:
    """The prefix graph and suffix graphs of a bundle whose adapters start at layer `first_adapted_layer`
    (> 0); None if the graphs do not show one tensor entering that layer from the one before."""
    if first_adapted_layer < 1:
        return None
    boundary = boundary_tensor(eval_model.graph, first_adapted_layer)
    if boundary is None or boundary_tensor(training_model.graph, first_adapted_layer) != boundary:
        return None
    suffix_training = suffix_graph(training_model, boundary, hidden_size, trainable)
    prefix = prefix_graph(eval_model, boundary, hidden_size, trainable)
    return PrefixSplit(
        prefix=prefix,
        suffix_training=suffix_training,
        suffix_eval=suffix_graph(eval_model, boundary, hidden_size, trainable),
        boundary=boundary,
        prefix_nodes=len(prefix.graph.node) - 1,
        suffix_training_nodes_removed=len(training_model.graph.node) - len(suffix_training.graph.node),
    )
