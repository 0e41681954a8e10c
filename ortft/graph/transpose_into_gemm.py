"""Turn MatMul(A, Transpose(W)) with a 2-D A into Gemm(A, W, transB=1): no transposed copy of W.

A weight that is also read elsewhere cannot be stored pre-transposed (see pretranspose_frozen_weights.py): an LM head
tied to the embedding table is read by Gather as [vocab, hidden] and by the head as its transpose.
torch exports the head as MatMul(hidden, Transpose(table)), so every step wrote a transposed copy of
the whole table (113 MB for SmolLM2's 49k x 576), kept it for the backward pass, and a quantized
table could not be used there at all (ORT cannot move an int4 DequantizeLinear past a Transpose).
ortft's loss graph feeds the head a 2-D [labelled positions, hidden] tensor, so Gemm with transB=1
computes the same product from the table as it is; its gradient reads the table directly too.

Only MatMuls whose first input is known to be rank 2 (declared in the graph, else found by ONNX shape
inference on a weightless skeleton of it), and whose
Transpose swaps the two axes of a rank-2 tensor, are rewritten; a Transpose left without consumers
is removed.
"""

from __future__ import annotations

from .base import GraphPass, PassResult, producers_of


def declared_ranks(graph) -> dict[str, int]:
    """Rank of every tensor whose shape the graph declares (inputs, outputs, value_info, initializers)."""
    ranks = {}
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            ranks[value.name] = len(tensor_type.shape.dim)
    for initializer in graph.initializer:
        ranks[initializer.name] = len(initializer.dims)
    return ranks


def inferred_ranks(model) -> dict[str, int]:
    """Ranks from ONNX shape inference run on a weightless skeleton of `model` (initializers become
    typed inputs), so graphs of any size work and no weight bytes are copied."""
    import onnx
    from onnx import helper

    graph = model.graph
    inputs = list(graph.input)
    declared = {value.name for value in inputs}
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer
               if t.name not in declared]
    skeleton = helper.make_model(
        helper.make_graph(list(graph.node), graph.name, inputs, list(graph.output), value_info=list(graph.value_info)),
        opset_imports=list(model.opset_import), ir_version=model.ir_version,
    )
    try:
        skeleton = onnx.shape_inference.infer_shapes(skeleton)
    except Exception:  # noqa: BLE001 - inference is an optimisation aid: without it the pass changes nothing
        return {}
    return declared_ranks(skeleton.graph)


def swaps_two_axes(node) -> bool:
    perm = next((list(attribute.ints) for attribute in node.attribute if attribute.name == "perm"), None)
    return perm in (None, [1, 0])


class TransposeIntoGemm(GraphPass):
    def call(self, model) -> PassResult:
        from onnx import helper

        graph = model.graph
        ranks = declared_ranks(graph)
        producers = producers_of(graph)
        count = 0
        inferred = False
        for node in graph.node:
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
                continue
            transpose = producers.get(node.input[1])
            if transpose is None or transpose.op_type != "Transpose" or not swaps_two_axes(transpose):
                continue
            if node.input[0] not in ranks and not inferred:
                ranks = {**inferred_ranks(model), **ranks}
                inferred = True
            if ranks.get(transpose.input[0]) != 2 or ranks.get(node.input[0]) != 2:
                continue
            node.op_type = "Gemm"
            node.input[1] = transpose.input[0]
            node.attribute.append(helper.make_attribute("transB", 1))
            count += 1
        if not count:
            return PassResult(model, False, 0)
        used = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
        kept = [node for node in graph.node if not (node.op_type == "Transpose" and not any(o in used for o in node.output))]
        del graph.node[:]
        graph.node.extend(kept)
        return PassResult(model, True, count)
