"""Causal attention in query chunks: no [seq, seq] tensor is kept, or built, for the backward pass.

The training export writes Llama-style attention as one placeholder node (an `org.pytorch.aten::ATen`
node with operator `ortft_causal_attention`, see ortft/prepare/attention_placeholder.py), and ORT's
gradient builder gets a gradient definition for it (`gradient_definitions()`) that makes one placeholder
backward node (`ortft_causal_attention_backward`). Neither runs anywhere: this pass replaces both, in the
generated training and eval graphs, by standard ONNX:

- Forward: an ONNX `Loop` over ceil(seq / C) chunks of ceil(seq / n) query rows (C = `chunk_rows`).
  Chunk i's rows [i*R, i*R + R) attend to keys [lo, min(seq, i*R + R)): the keys after the chunk are
  never multiplied (causality by block position), lo > 0 only with a sliding window. Inside, scores,
  the causal/padding/window mask and the softmax exist for that chunk only ([batch, heads, R, keys]);
  the mask is made from row and column indices (Range) and the [batch, seq] padding mask, never as a
  [seq, seq] tensor. The query heads that share a key head are a batch axis of their own against keys
  and values broadcast along it ([b, kv_heads, groups, rows, d] x [b, kv_heads, 1, d, keys]), so keys
  and values are read as they are (no repeat_kv copies) and the products have b * heads batch items.
- Backward: a second `Loop` over the same chunks recomputes each chunk's probabilities and gives
  dV += P^T dO, dP = dO V^T, dS = P * (dP - D) with D = rowsum(dO * O), dQ = scale * dS K and
  dK += dS^T (scale * Q): the flash-attention backward, with row blocks. What the forward pass keeps
  for it is the scaled queries, keys, values and output: O(seq) per head.

Inputs of the placeholder: query [b, heads, seq, d] (rotary applied), key and value [b, kv_heads, seq, d],
attention_mask [b, seq] (1 keep, 0 padding), then constants: scaling (float), sliding_window (int, 0
none; key k is seen from row r when r - window < k <= r, as transformers' sliding-window mask) and
kv_groups (heads / kv_heads). Output: [b, seq, heads, d], what eager attention returns after its
transpose. A masked score gets float32's lowest value added, as transformers' eager mask does, so a row
whose keys are all padding gets a uniform distribution, not NaN.
"""

from __future__ import annotations

from ..config import ATTENTION_CHUNK_ROWS
from .base import GraphPass, PassResult

ATEN_DOMAIN = "org.pytorch.aten"
FORWARD_OPERATOR = "ortft_causal_attention"
BACKWARD_OPERATOR = "ortft_causal_attention_backward"
PREFIX = "ortft_attention"
FLOAT32_LOWEST = -3.4028234663852886e38
INPUTS = ("query", "key", "value", "attention_mask", "scaling", "sliding_window", "kv_groups")


def gradient_definitions() -> list[dict]:
    """What ORT's gradient builder makes for a forward placeholder: one backward placeholder reading the
    output's gradient, the forward's inputs and its output; writing the gradients of query, key, value.
    JSON-able, for ortft/prepare/gradient_worker.py (`register_gradient_definition`)."""
    inputs = ["GO(0)"] + [f"I({index})" for index in range(len(INPUTS))] + ["O(0)"]
    node = {"op_type": "ATen", "domain": ATEN_DOMAIN, "inputs": inputs, "outputs": ["GI(0)", "GI(1)", "GI(2)"],
            "attributes": {"operator": {"value": BACKWARD_OPERATOR, "dtype": "string"}}}
    return [{"key": f"{ATEN_DOMAIN}::ATen::{FORWARD_OPERATOR}::", "nodes": [node]}]


def placeholder_operator(node) -> str | None:
    """`ortft_causal_attention` / `..._backward` for the placeholders, None for any other node."""
    if node.op_type != "ATen" or node.domain != ATEN_DOMAIN:
        return None
    for attribute in node.attribute:
        if attribute.name == "operator":
            value = attribute.s.decode()
            return value if value in (FORWARD_OPERATOR, BACKWARD_OPERATOR) else None
    return None


class _Emitter:
    """Collects nodes whose outputs get unique names under `prefix`; constants are Constant nodes, so a
    loop body never reads the outer graph's initializers."""

    def __init__(self, prefix: str, opset: int):
        self.prefix = prefix
        self.opset = opset
        self.nodes = []
        self._count = 0

    def name(self, suffix: str) -> str:
        self._count += 1
        return f"{self.prefix}/{suffix}_{self._count}"

    def op(self, op_type: str, inputs: list[str], suffix: str | None = None, out: str | None = None, **attributes) -> str:
        from onnx import helper

        output = out or self.name(suffix or op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attributes))
        return output

    def const(self, value, dtype: str = "int64", suffix: str = "const") -> str:
        import numpy as np
        from onnx import numpy_helper

        return self.op("Constant", [], suffix, value=numpy_helper.from_array(np.asarray(value, dtype=dtype)))

    def ints(self, *values: int) -> str:
        return self.const(list(values), "int64", "ints")

    def vector(self, scalar: str) -> str:
        """A [1] tensor from a scalar."""
        return self.op("Reshape", [scalar, self.ints(1)], "vector")

    def scalar(self, vector: str) -> str:
        """A scalar from a [1] tensor."""
        return self.op("Reshape", [vector, self.const([], "int64")], "scalar")

    def dims(self, data: str, start: int, end: int) -> str:
        """Dimensions [start, end) of `data`'s shape (Shape's start/end attributes are opset 15's)."""
        if self.opset >= 15:
            return self.op("Shape", [data], "dims", start=start, end=end)
        return self.slice(self.op("Shape", [data], "shape"), self.ints(start), self.ints(end), 0)

    def concat(self, parts: list[str]) -> str:
        return self.op("Concat", parts, "concat", axis=0)

    def reduce_sum(self, data: str, axes: list[int], keepdims: int = 1, suffix: str = "sum") -> str:
        if self.opset >= 13:
            return self.op("ReduceSum", [data, self.ints(*axes)], suffix, keepdims=keepdims)
        return self.op("ReduceSum", [data], suffix, axes=axes, keepdims=keepdims)

    def unsqueeze(self, data: str, axes: list[int]) -> str:
        if self.opset >= 13:
            return self.op("Unsqueeze", [data, self.ints(*axes)], "unsqueeze")
        return self.op("Unsqueeze", [data], "unsqueeze", axes=axes)

    def less_or_equal(self, a: str, b: str) -> str:
        if self.opset >= 16:
            return self.op("LessOrEqual", [a, b], "le")
        return self.op("Not", [self.op("Greater", [a, b], "gt")], "le")

    def transpose(self, data: str, perm: list[int]) -> str:
        return self.op("Transpose", [data], "transpose", perm=perm)

    def slice(self, data: str, start: str, end: str, axis: int) -> str:
        return self.op("Slice", [data, start, end, self.ints(axis)], "slice")

    def pad_axis(self, data: str, rank: int, axis: int, before: str, after: str) -> str:
        """Zero-pad `data` along `axis` by `before` and `after` ([1] tensors)."""
        zero = self.ints(0)
        pads = [zero] * (2 * rank)
        pads[axis], pads[rank + axis] = before, after
        return self.op("Pad", [data, self.concat(pads)], "pad")


class _Layout:
    """The chunking of one attention call: outer-graph tensors both loops read."""

    def __init__(self, e: _Emitter, query: str, key: str, value: str, mask: str, scaling: float, window: int,
                 groups: int, chunk_rows: int):
        self.key, self.value, self.scaling, self.window, self.groups = key, value, scaling, window, groups
        self.batch = e.dims(mask, 0, 1)
        self.seq = e.dims(mask, 1, 2)  # [1]
        self.head_dim = e.dims(query, 3, 4)
        chunks = e.op("Div", [e.op("Add", [self.seq, e.ints(chunk_rows - 1)]), e.ints(chunk_rows)], "chunks")
        self.chunks = e.op("Max", [chunks, e.ints(1)], "chunks_at_least_one")  # an empty sequence: one empty chunk
        self.rows = e.op("Div", [e.op("Add", [self.seq, e.op("Sub", [self.chunks, e.ints(1)])]), self.chunks], "rows")
        self.padded = e.op("Mul", [self.chunks, self.rows], "padded")
        self.padding = e.op("Sub", [self.padded, self.seq], "padding")
        self.seq_scalar = e.scalar(self.seq)
        self.rows_scalar = e.scalar(self.rows)
        self.chunks_scalar = e.scalar(self.chunks)
        self.key_allowed = e.op("Cast", [mask], "key_allowed", to=9)  # BOOL
        scaled = e.op("Mul", [query, e.const(scaling, "float32")], "scaled_query")
        self.query_chunks = self.chunked(e, scaled, 2)  # [b, kv_heads, groups, chunks, rows, d]

    def chunked(self, e: _Emitter, data: str, rank_axis: int) -> str:
        """[b, heads, seq, x] -> [b, kv_heads, groups, chunks, rows, x], zero rows appended."""
        padded = e.pad_axis(data, 4, rank_axis, e.ints(0), self.padding)
        tail = e.dims(data, 3, 4)
        shape = e.concat([self.batch, e.ints(-1, self.groups), self.chunks, self.rows, tail])
        return e.op("Reshape", [padded, shape], "chunked")

    def unchunked(self, e: _Emitter, stacked: str, seq_axis: int) -> str:
        """Loop scan output [chunks, b, kv_heads, groups, rows, d] -> [b, seq, heads, d] (seq_axis 1) or
        [b, heads, seq, d] (seq_axis 2), the appended rows dropped."""
        six = e.op("Reshape", [stacked, e.concat([self.chunks, self.batch, e.ints(-1, self.groups), self.rows,
                                                    self.head_dim])], "stacked")
        if seq_axis == 1:
            ordered = e.transpose(six, [1, 0, 4, 2, 3, 5])  # [b, chunks, rows, kv_heads, groups, d]
            shape = e.concat([self.batch, self.padded, e.ints(-1), self.head_dim])
        else:
            ordered = e.transpose(six, [1, 2, 3, 0, 4, 5])  # [b, kv_heads, groups, chunks, rows, d]
            shape = e.concat([self.batch, e.ints(-1), self.padded, self.head_dim])
        flat = e.op("Reshape", [ordered, shape], "unchunked")
        return e.slice(flat, e.ints(0), self.seq, seq_axis)


def _chunk_probabilities(b: _Emitter, layout: _Layout, index: str) -> dict:
    """Inside a loop body: chunk `index`'s queries, keys, values and softmax probabilities."""
    start = b.op("Mul", [index, layout.rows_scalar], "start")
    stop = b.op("Add", [start, layout.rows_scalar], "stop")
    end = b.op("Min", [stop, layout.seq_scalar], "end")  # keys after the chunk's last row are never read
    if layout.window:
        low = b.op("Max", [b.op("Sub", [start, b.const(layout.window - 1)], "window_start"), b.const(0)], "low")
    else:
        low = b.const(0)
    low_1, end_1 = b.vector(low), b.vector(end)
    # Queries keep their groups as a batch axis and keys/values get a broadcast one: [b, kv, groups, rows, d]
    # against [b, kv, 1, keys, d]. The products then have b * kv * groups batch items, not b * kv: with 3
    # key heads (SmolLM2) and 2 threads, 3 items ran at 67% of the work split's speed (docs/findings.md).
    query = b.op("Gather", [layout.query_chunks, index], "query", axis=3)  # [b, kv, groups, rows, d]
    key = b.unsqueeze(b.slice(layout.key, low_1, end_1, 2), [2])  # [b, kv, 1, keys, d]
    value = b.unsqueeze(b.slice(layout.value, low_1, end_1, 2), [2])
    scores = b.op("MatMul", [query, b.transpose(key, [0, 1, 2, 4, 3])], "scores")  # [b, kv, groups, rows, keys]
    rows = b.unsqueeze(b.op("Range", [start, stop, b.const(1)], "row_index"), [1])  # [rows, 1]
    columns = b.op("Range", [low, end, b.const(1)], "column_index")  # [keys]
    allowed = b.less_or_equal(columns, rows)  # [rows, keys]
    if layout.window:
        allowed = b.op("And", [allowed, b.op("Greater", [columns, b.op("Sub", [rows, b.const(layout.window)])], "in_window")])
    padding = b.unsqueeze(b.slice(layout.key_allowed, low_1, end_1, 1), [1])  # [b, 1, keys]
    allowed = b.op("And", [allowed, padding], "allowed")  # [b, rows, keys]
    bias = b.op("Where", [allowed, b.const(0.0, "float32"), b.const(FLOAT32_LOWEST, "float32")], "bias")
    masked = b.op("Add", [scores, b.unsqueeze(bias, [1, 2])], "masked")
    probabilities = b.op("Softmax", [masked], "softmax", axis=-1)  # [b, kv, groups, rows, keys]
    return {"query": query, "key": key, "value": value, "probabilities": probabilities, "low": low_1, "end": end_1}


def _loop_graph(name: str, nodes: list, inputs: list, outputs: list):
    from onnx import helper

    return helper.make_graph(nodes, name, inputs, outputs)


def _value(name: str, elem_type: int, rank: int = 4):
    """A typed loop-body input or output: scalars (rank 0) or tensors of unknown dimensions."""
    from onnx import helper

    return helper.make_tensor_value_info(name, elem_type, [None] * rank)


def emit_forward(e: _Emitter, layout: _Layout, output: str) -> None:
    """The forward Loop: each chunk's attention output, stacked, then laid out as [b, seq, heads, d]."""
    from onnx import TensorProto, helper

    body = _Emitter(f"{e.prefix}/forward", e.opset)
    index, condition = body.name("i"), body.name("condition")
    chunk = _chunk_probabilities(body, layout, index)
    chunk_output = body.op("MatMul", [chunk["probabilities"], chunk["value"]], "chunk_output")
    keep_going = body.op("Identity", [condition], "keep_going")
    graph = _loop_graph(f"{e.prefix}/forward_body", body.nodes,
                        [_value(index, TensorProto.INT64, 0), _value(condition, TensorProto.BOOL, 0)],
                        [_value(keep_going, TensorProto.BOOL, 0), _value(chunk_output, TensorProto.FLOAT, 5)])
    stacked = e.name("forward_chunks")
    e.nodes.append(helper.make_node("Loop", [layout.chunks_scalar, ""], [stacked], name=stacked, body=graph))
    e.op("Identity", [layout.unchunked(e, stacked, 1)], out=output)


def emit_backward(e: _Emitter, layout: _Layout, output_grad: str, output: str, wanted: dict[str, str]) -> None:
    """The backward Loop; `wanted` maps "query"/"key"/"value" to the gradient names to write (those read)."""
    from onnx import TensorProto, helper

    rowsum = e.reduce_sum(e.op("Mul", [output_grad, output], "grad_times_output"), [-1])  # D, [b, seq, heads, 1]
    grad_chunks = layout.chunked(e, e.transpose(output_grad, [0, 2, 1, 3]), 2)
    rowsum_chunks = layout.chunked(e, e.transpose(rowsum, [0, 2, 1, 3]), 2)
    body = _Emitter(f"{e.prefix}/backward", e.opset)
    index, condition = body.name("i"), body.name("condition")
    carried = [name for name in ("key", "value") if name in wanted]
    carried_in = {name: body.name(f"{name}_grad_in") for name in carried}
    chunk = _chunk_probabilities(body, layout, index)
    probabilities = chunk["probabilities"]

    def rows_of(chunks: str) -> str:
        return body.op("Gather", [chunks, index], "rows_of", axis=3)  # [b, kv, groups, rows, x]

    grad = rows_of(grad_chunks)  # dO, [b, kv, groups, rows, d]
    carried_out = {}
    if "value" in wanted:  # [b, kv, groups, keys, d], then the groups' sum: [b, kv, keys, d]
        per_group = body.op("MatMul", [body.transpose(probabilities, [0, 1, 2, 4, 3]), grad], "value_grad_per_group")
        carried_out["value"] = body.reduce_sum(per_group, [2], keepdims=0, suffix="value_grad")
    grad_probabilities = body.op("MatMul", [grad, body.transpose(chunk["value"], [0, 1, 2, 4, 3])], "probs_grad")
    grad_scores = body.op("Mul", [probabilities, body.op("Sub", [grad_probabilities, rows_of(rowsum_chunks)])],
                          "scores_grad")
    outputs = []
    if "query" in wanted:
        outputs.append(body.op("MatMul", [grad_scores, chunk["key"]], "query_grad"))  # [b, kv, groups, rows, d]
    if "key" in wanted:
        per_group = body.op("MatMul", [body.transpose(grad_scores, [0, 1, 2, 4, 3]), chunk["query"]], "key_grad_per_group")
        carried_out["key"] = body.reduce_sum(per_group, [2], keepdims=0, suffix="key_grad")
    after = body.op("Sub", [layout.seq, chunk["end"]], "after")
    for name in carried:
        placed = body.pad_axis(carried_out[name], 4, 2, chunk["low"], after)
        carried_out[name] = body.op("Add", [carried_in[name], placed], f"{name}_grad_sum")
    keep_going = body.op("Identity", [condition], "keep_going")
    graph = _loop_graph(
        f"{e.prefix}/backward_body", body.nodes,
        [_value(index, TensorProto.INT64, 0), _value(condition, TensorProto.BOOL, 0)]
        + [_value(carried_in[name], TensorProto.FLOAT) for name in carried],
        [_value(keep_going, TensorProto.BOOL, 0)] + [_value(carried_out[name], TensorProto.FLOAT) for name in carried]
        + [_value(name, TensorProto.FLOAT, 5) for name in outputs])
    zeros = {name: e.op("ConstantOfShape", [e.op("Shape", [getattr(layout, name)])], f"{name}_grad_zero",
                        value=_float_tensor(0.0)) for name in carried}
    results = [e.name(f"{name}_grad") for name in carried] + [e.name("query_grad_chunks")] * bool(outputs)
    loop = e.name("backward_loop")
    e.nodes.append(helper.make_node("Loop", [layout.chunks_scalar, ""] + [zeros[name] for name in carried], results,
                                    name=loop, body=graph))
    for name, result in zip(carried, results):
        e.op("Identity", [result], out=wanted[name])
    if "query" in wanted:
        query_grad = layout.unchunked(e, results[-1], 2)
        e.op("Mul", [query_grad, e.const(layout.scaling, "float32")], out=wanted["query"])


def _float_tensor(value: float):
    import numpy as np
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray([value], dtype=np.float32))


class BlockedAttention(GraphPass):
    """Replace the attention placeholders of a training or eval graph (module docstring); in place."""

    def __init__(self, chunk_rows: int = ATTENTION_CHUNK_ROWS):
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
        self.chunk_rows = chunk_rows

    def call(self, model) -> PassResult:
        from .base import consumers_of
        from .upgrade_opset import default_opset

        graph = model.graph
        opset = default_opset(model)
        forwards = [node for node in graph.node if placeholder_operator(node) == FORWARD_OPERATOR]
        if not forwards:
            return PassResult(model, False, 0)
        constants = _constant_values(graph)
        consumers = consumers_of(graph)
        graph_outputs = {value.name for value in graph.output}
        layouts, replacement = {}, {}
        for number, node in enumerate(forwards):
            e = _Emitter(f"{PREFIX}{number}", opset)
            query, key, value, mask = node.input[:4]
            scaling, window, groups = (constants[name] for name in node.input[4:7])
            layout = _Layout(e, query, key, value, mask, float(scaling), int(window), int(groups), self.chunk_rows)
            emit_forward(e, layout, node.output[0])
            layouts[node.output[0]] = (layout, number)
            replacement[id(node)] = e.nodes
        for node in graph.node:
            if placeholder_operator(node) != BACKWARD_OPERATOR:
                continue
            layout, number = layouts[node.input[-1]]
            wanted = {name: grad for name, grad in zip(("query", "key", "value"), node.output)
                      if grad and (consumers.get(grad) or grad in graph_outputs)}
            e = _Emitter(f"{PREFIX}{number}_Grad", opset)  # "_Grad/": backward nodes to recompute.backward_nodes
            emit_backward(e, layout, node.input[0], node.input[-1], wanted)
            replacement[id(node)] = e.nodes
        nodes = []
        for node in graph.node:
            nodes.extend(replacement.get(id(node), [node]))
        del graph.node[:]
        graph.node.extend(nodes)
        _drop_unread_constants(graph, {name for node in forwards for name in node.input[4:]})
        return PassResult(model, True, len(forwards))


def _constant_values(graph) -> dict:
    """Name -> numpy value of every Constant node output and inline initializer."""
    from onnx import numpy_helper

    values = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer if not tensor.external_data}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values



def _drop_unread_constants(graph, candidates: set) -> None:
    """Remove the placeholders' constant inputs (Constant nodes or inline initializers) nothing reads now:
    ORT warns about every unused initializer it loads."""
    read = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    unread = candidates - read
    if not unread:
        return
    kept = [node for node in graph.node if not (node.op_type == "Constant" and node.output[0] in unread)]
    del graph.node[:]
    graph.node.extend(kept)
    initializers = [tensor for tensor in graph.initializer if tensor.name not in unread]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
