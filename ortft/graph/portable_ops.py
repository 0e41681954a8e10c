"""Rewrite two patterns of the finished graphs that OpenVINO's provider mishandles, into exact equivalents.

Every provider runs the result; the values are bit for bit the same on ORT's CPU provider.

- Size(x) -> ReduceProd(Shape(x), keepdims=0). OpenVINO's provider does not take Size, so every Size
  (the SliceGrad/GatherGrad lowerings', ortft/graph/delay_recomputation.py's) stays on the CPU; the
  provider's partitioning around those CPU nodes in the backward pass made clusters whose fused nodes
  form a cycle ("This is an invalid model. Error: the graph is not acyclic" at session creation with
  onnxruntime-openvino 1.24.1).
- Transpose(Gemm(A, B; transA, transB, alpha), perm=[1, 0]) -> Gemm(B, A; 1 - transB, 1 - transA, alpha),
  as (op(A) op(B))^T = op(B)^T op(A)^T: the gradient of a LoRA matrix the gradient builder writes as
  a Gemm followed by a Transpose. Left in, ORT's own GemmTransposeFusion makes the same Gemm at session
  load, and OpenVINO's provider then loses the fused Gemm's output name: the first run fails with
  "Output names mismatch between OpenVINO and ONNX". Done here, ORT has nothing to fuse and OpenVINO
  keeps the name. Only for a two-input Gemm whose output nothing else reads and is no graph output.
"""

from __future__ import annotations

from .base import GraphPass, PassResult, consumers_of

PREFIX = "ortft_portable"


class PortableOps(GraphPass):
    """Both rewrites of the module docstring, on the main graph; in place. `count` is how many nodes."""

    def call(self, model) -> PassResult:
        graph = model.graph
        count = _fuse_gemm_transposes(graph) + _size_as_shape_product(graph)
        return PassResult(model, count > 0, count)


def _size_as_shape_product(graph) -> int:
    from onnx import helper

    nodes, count = [], 0
    for node in graph.node:
        if node.op_type != "Size" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        shape = f"{PREFIX}/{node.name or node.output[0]}/shape"
        nodes.append(helper.make_node("Shape", [node.input[0]], [shape], name=shape))
        nodes.append(helper.make_node("ReduceProd", [shape], [node.output[0]], name=node.name or node.output[0], keepdims=0))
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
    return count


def _fuse_gemm_transposes(graph) -> int:
    from onnx import helper

    producer = {output: node for node in graph.node for output in node.output}
    consumers = consumers_of(graph)
    graph_outputs = {value.name for value in graph.output}
    fused = set()
    for node in graph.node:
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or _ints(node, "perm", [1, 0]) != [1, 0]:
            continue
        gemm = producer.get(node.input[0])
        if (gemm is None or gemm.op_type != "Gemm" or gemm.domain not in ("", "ai.onnx") or len(gemm.input) != 2
                or len(consumers.get(gemm.output[0], [])) != 1 or gemm.output[0] in graph_outputs):
            continue
        trans_a, trans_b = _int(gemm, "transA", 0), _int(gemm, "transB", 0)
        gemm.CopyFrom(helper.make_node("Gemm", [gemm.input[1], gemm.input[0]], [node.output[0]], name=gemm.name,
                                       transA=1 - trans_b, transB=1 - trans_a, alpha=_float(gemm, "alpha", 1.0)))
        fused.add(id(node))
    if fused:
        kept = [node for node in graph.node if id(node) not in fused]
        del graph.node[:]
        graph.node.extend(kept)
    return len(fused)


def _attribute(node, name: str):
    for attribute in node.attribute:
        if attribute.name == name:
            return attribute
    return None


def _int(node, name: str, default: int) -> int:
    attribute = _attribute(node, name)
    return attribute.i if attribute is not None else default


def _float(node, name: str, default: float) -> float:
    attribute = _attribute(node, name)
    return attribute.f if attribute is not None else default


def _ints(node, name: str, default: list[int]) -> list[int]:
    attribute = _attribute(node, name)
    return list(attribute.ints) if attribute is not None else default
