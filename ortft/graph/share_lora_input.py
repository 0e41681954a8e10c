"""Run the LoRA down-projections that read the same input as one product.

q, k and v read the same normed hidden state, and so do gate and up. PEFT exports each adapter's
down-projection on its own: MatMul(x, Transpose(A_i)), r columns each. Every such product reads the
full-width x once in the forward pass, and its gradients read it again (dA_i = x^T dH_i) and write a
full-width input gradient (dH_i A_i) that a Sum then adds up. With the A_i stacked,

    [H_1 | ... | H_n] = MatMul(x, Transpose(Concat(A_1, ..., A_n)))

and a Split into the r_i-wide pieces, x is read once per pass, one input gradient is written, and the
rank-sized Concat/Split cost next to nothing. The forward products are the same; the input gradient
adds the adapters' contributions inside one product instead of in the Sum (equal up to float
rounding). The adapters stay separate trainable tensors (the PEFT contract).

Matched: at least two MatMul(x, T_i) with the same x, where T_i = Transpose(A_i) (perm [1, 0] or
none) of a trainable 2-D initializer A_i and T_i is read by that MatMul only.
"""

from __future__ import annotations

from .base import GraphPass, PassResult, consumers_of, producers_of


class ShareLoraInput(GraphPass):
    def __init__(self, trainable: set[str]):
        self.trainable = set(trainable)

    def call(self, model) -> PassResult:
        import numpy as np
        from onnx import helper, numpy_helper

        graph = model.graph
        nodes = list(graph.node)
        producers = producers_of(graph)
        readers = consumers_of(graph)
        outputs = {value.name for value in graph.output}
        shapes = {tensor.name: list(tensor.dims) for tensor in graph.initializer}
        groups: dict[str, list] = {}
        for node in nodes:
            down = self._down_projection(node, producers, readers, outputs, shapes)
            if down is not None:
                groups.setdefault(node.input[0], []).append(down)
        groups = {x: members for x, members in groups.items() if len(members) >= 2}
        if not groups:
            return PassResult(model, False, 0)
        replaced: dict[int, list] = {}  # id of the group's first MatMul -> the nodes that replace the group
        dropped: set[int] = set()
        for index, (x, members) in enumerate(groups.items()):
            prefix = f"ortft_shared_lora_input{index}"
            stacked, transposed, product = f"{prefix}/stacked_A", f"{prefix}/stacked_A_T", f"{prefix}/product"
            sizes = f"{prefix}/split_sizes"
            graph.initializer.append(numpy_helper.from_array(
                np.array([shapes[weight][0] for _matmul, _transpose, weight in members], dtype=np.int64), sizes))
            replacement = [
                helper.make_node("Concat", [weight for _m, _t, weight in members], [stacked], name=f"{prefix}/Concat", axis=0),
                helper.make_node("Transpose", [stacked], [transposed], name=f"{prefix}/Transpose", perm=[1, 0]),
                helper.make_node("MatMul", [x, transposed], [product], name=f"{prefix}/MatMul"),
                helper.make_node("Split", [product, sizes], [matmul.output[0] for matmul, _t, _w in members],
                                 name=f"{prefix}/Split", axis=-1),
            ]
            replaced[id(members[0][0])] = replacement
            for matmul, transpose, _weight in members:
                dropped.update({id(matmul), id(transpose)})
        ordered = []
        for node in nodes:
            if id(node) in replaced:
                ordered.extend(replaced[id(node)])
            elif id(node) not in dropped:
                ordered.append(node)
        del graph.node[:]
        graph.node.extend(ordered)
        return PassResult(model, True, sum(len(members) for members in groups.values()))

    def _down_projection(self, node, producers, readers, outputs, shapes):
        """(MatMul, Transpose, A) when `node` is MatMul(x, Transpose(A)) of a trainable 2-D A, else None."""
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            return None
        transpose = producers.get(node.input[1])
        if transpose is None or transpose.op_type != "Transpose" or node.input[1] in outputs:
            return None
        weight = transpose.input[0]
        perm = [list(attribute.ints) for attribute in transpose.attribute if attribute.name == "perm"]
        if weight not in self.trainable or len(shapes.get(weight, [])) != 2 or perm not in ([], [[1, 0]]):
            return None
        if len(readers.get(node.input[1], [])) != 1 or node.input[0] == weight:
            return None
        return node, transpose, weight
