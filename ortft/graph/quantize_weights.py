"""Store chosen frozen 2-D weights quantized (int8 or int4), dequantized in the graph by DequantizeLinear.

Each chosen float initializer W becomes Constant nodes (the quantized values, the scales and, for
asymmetric int4, the zero points) feeding one DequantizeLinear whose float32 output replaces W for
every consumer; the initializer is removed. The quantized tensors are Constant nodes, not
initializers, because ORT's checkpoint cannot hold int4 and everything frozen that is an initializer
goes there: as Constants they stay inside the training and eval graphs.

Groups (scale blocks) run along W's input dimension: axis 0 when W feeds MatMul as its B input
directly (a pre-transposed [in, out] weight), axis 1 otherwise ([out, in], e.g. behind a Transpose or
an embedding table read by Gather). int8 is per output channel (opset 13); int4 is blocked (opset 21).
`self.layers` holds, per quantized tensor, its bytes before/after and the error statistics.

`exact_names` are stored as int8 in blocks of 32 along the input axis (opset 21) only if that is lossless
(`quantize_int8_exact`: an embedding table that a GGUF held as Q8_0), whatever the scheme; a weight
that is not exactly representable stays float (in `self.skipped`), as if it had not been named.

A weight far larger than the others (an untied LM head: 32000 x 2048 on a 1.1B Llama, 262 MB once
dequantized) is split into column parts of at most `part_elements` values, each with its own
DequantizeLinear and MatMul, joined by a Concat on the last axis. Only one part's float32 copy exists
at a time, also in the backward pass, where the dequantized head otherwise sits on top of every saved
activation at the peak. Splitting the output columns changes no value: the scales run along the input
axis, so each part is exactly the quantization of those columns.

Weights read through a Transpose are left in float (listed in `self.skipped`): ORT 1.19's QDQ
propagation moves a DequantizeLinear past a Transpose by inserting a QuantizeLinear that cannot be
int4, and the session fails to load. Frozen linear weights are pre-transposed before this pass, so
in practice only an LM head tied to the embedding table (Gather + Transpose) is affected.
"""

from __future__ import annotations

from ..config import INT4_BLOCK_SIZE
from ..quantize import Q8_0_BLOCK_SIZE
from .base import GraphPass, PassResult, consumers_of
from .upgrade_opset import default_opset

DEQUANTIZED_SUFFIX = "_dequantized"
NODE_PREFIX = "ortft_dq/"
EXACT_BLOCK_SIZE = Q8_0_BLOCK_SIZE  # exact_names: GGUF's Q8_0 block, whatever --block-size says
PART_ELEMENTS = 1 << 23  # 8 Mi values = 32 MiB dequantized: above any 1B model's MLP weight (2048 x 5632)


def input_axis(name: str, users: list) -> int:
    """0 if every consumer is MatMul(x, W) ([in, out] layout); else 1 (W is [out, in])."""
    if users and all(node.op_type == "MatMul" and list(node.input).index(name) == 1 and node.input[0] != name for node in users):
        return 0
    return 1


def linear_weights(model, names: set[str] | None = None) -> list[str]:
    """Frozen 2-D initializers that feed MatMul (directly or through a [1, 0] Transpose)."""
    graph = model.graph
    consumers = consumers_of(graph)
    found = []
    for tensor in graph.initializer:
        if len(tensor.dims) != 2 or (names is not None and tensor.name not in names):
            continue
        users = consumers.get(tensor.name, [])
        feeds_matmul = any(
            (node.op_type in ("MatMul", "Gemm") and tensor.name in node.input[:2])
            or (node.op_type == "Transpose" and any(c.op_type in ("MatMul", "Gemm") for out in node.output for c in consumers.get(out, [])))
            for node in users
        )
        if feeds_matmul:
            found.append(tensor.name)
    return found


def embedding_weights(model) -> list[str]:
    """2-D initializers read by Gather as the table (embeddings; a tied LM head shares one)."""
    graph = model.graph
    tables = {node.input[0] for node in graph.node if node.op_type == "Gather"}
    return [tensor.name for tensor in graph.initializer if len(tensor.dims) == 2 and tensor.name in tables]


class QuantizeWeights(GraphPass):
    """W -> DequantizeLinear(q, scale[, zero_point]); the quantized tensors become Constant nodes.

    With `as_inputs=True` they become graph inputs instead (kept in `self.tensors`): ORT's artifact
    generation would constant-fold a DequantizeLinear of Constants back into a float32 initializer,
    so the bundle builder hides them as inputs and `ExternalizeInputs` (externalize_inputs.py) turns them into
    initializers of the generated graphs, stored once in a shared data file.
    """

    def __init__(self, names, scheme: str, block_size: int = INT4_BLOCK_SIZE, symmetric: bool = True, as_inputs: bool = False,
                 part_elements: int | None = None, exact_names=()):
        self.exact_names = list(dict.fromkeys(exact_names))
        self.names = list(dict.fromkeys([*names, *self.exact_names]))
        self.part_elements = PART_ELEMENTS if part_elements is None else part_elements  # 0: never split
        self.scheme = scheme
        self.block_size = block_size
        self.symmetric = symmetric
        self.as_inputs = as_inputs
        self.layers: dict[str, dict] = {}
        self.tensors: dict = {}  # name -> TensorProto of every quantized value / scale / zero point
        self.skipped: dict[str, str] = {}  # name -> why it stayed float

    def call(self, model) -> PassResult:
        from onnx import TensorProto, numpy_helper

        from ..quantize import error_stats, quantize, quantize_int8_exact

        graph = model.graph
        needed = 21 if self.scheme == "int4" else 13
        if default_opset(model) < needed:
            raise ValueError(f"{self.scheme} DequantizeLinear needs opset {needed}; the graph is at {default_opset(model)}")
        wanted = set(self.names)
        self._new_inputs = []
        consumers = consumers_of(graph)
        graph_outputs = {value.name for value in graph.output}
        new_nodes = []
        replaced: dict[int, list] = {}  # id(MatMul) -> the nodes that compute it part by part
        removed = set()
        for tensor in graph.initializer:
            name = tensor.name
            if name not in wanted or name in graph_outputs or tensor.data_type != TensorProto.FLOAT or len(tensor.dims) != 2:
                continue
            users = consumers.get(name, [])
            if not users:
                continue
            if any(node.op_type == "Transpose" for node in users):
                self.skipped[name] = "read through a Transpose (ORT's QDQ propagation cannot handle it)"
                continue
            weight = numpy_helper.to_array(tensor)
            axis = input_axis(name, users)
            exact = name in self.exact_names
            if exact:
                quantized = quantize_int8_exact(weight, axis, EXACT_BLOCK_SIZE) if default_opset(model) >= 21 else None
                if quantized is None:
                    self.skipped[name] = f"not exactly int8 x a scale per {EXACT_BLOCK_SIZE}-block (or the graph is below opset 21)"
                    continue
            else:
                quantized = quantize(weight, self.scheme, axis, self.block_size, self.symmetric)
            parts = self._column_parts(weight.shape, axis)
            if len(parts) == 1:
                dq_name = name + DEQUANTIZED_SUFFIX
                new_nodes.extend(self._nodes(name, dq_name, quantized))
                for node in users:
                    for index, value in enumerate(node.input):
                        if value == name:
                            node.input[index] = dq_name
            else:
                dq_names = []
                for number, (start, stop) in enumerate(parts):
                    dq_names.append(f"{name}/part{number}{DEQUANTIZED_SUFFIX}")
                    new_nodes.extend(self._nodes(f"{name}/part{number}", dq_names[-1], quantized.columns(start, stop)))
                for node in users:
                    replaced[id(node)] = _split_matmul(node, dq_names)
            self.layers[name] = {
                **({"scheme": "int8-exact", "block_size": EXACT_BLOCK_SIZE} if exact else {}),
                "shape": list(weight.shape),
                "parts": len(parts),
                "axis": axis,
                "bytes_before": int(weight.nbytes),
                "bytes_after": quantized.nbytes(),
                **error_stats(weight, quantized),
            }
            removed.add(name)
            del weight, quantized
        if not removed:
            return PassResult(model, False, 0)
        kept = [tensor for tensor in graph.initializer if tensor.name not in removed]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        inputs = [value for value in graph.input if value.name not in removed]
        del graph.input[:]
        graph.input.extend(inputs)
        nodes = list(new_nodes)
        for node in graph.node:
            nodes.extend(replaced.get(id(node), [node]))
        del graph.node[:]
        graph.node.extend(nodes)
        graph.input.extend(self._new_inputs)
        return PassResult(model, True, len(removed))

    def _column_parts(self, shape, axis: int) -> list[tuple[int, int]]:
        """[(start, stop)] output-column ranges: one range unless an [in, out] weight is over two parts' size."""
        rows, columns = shape
        if axis != 0 or not self.part_elements or rows * columns <= 2 * self.part_elements:
            return [(0, columns)]
        count = -(-rows * columns // self.part_elements)
        width = -(-columns // count)
        return [(start, min(start + width, columns)) for start in range(0, columns, width)]

    def _nodes(self, name: str, dq_name: str, quantized) -> list:
        from onnx import TensorProto, helper, numpy_helper

        from ..quantize import pack_int4

        prefix = NODE_PREFIX + name
        if quantized.scheme == "int8":
            values = numpy_helper.from_array(quantized.q, prefix + "/q")
            attributes = {"axis": 1 - quantized.axis} if quantized.block_size is None else {"axis": quantized.axis, "block_size": quantized.block_size}
        else:
            dtype = TensorProto.INT4 if quantized.symmetric else TensorProto.UINT4
            values = helper.make_tensor(prefix + "/q", dtype, list(quantized.q.shape), pack_int4(quantized.q), raw=True)
            attributes = {"axis": quantized.axis, "block_size": quantized.block_size}
        scale = numpy_helper.from_array(quantized.scale, prefix + "/scale")
        tensors = [values, scale]
        if quantized.zero_point is not None:
            tensors.append(helper.make_tensor(prefix + "/zero_point", TensorProto.UINT4, list(quantized.zero_point.shape),
                                              pack_int4(quantized.zero_point), raw=True))
        nodes = []
        for tensor in tensors:
            self.tensors[tensor.name] = tensor
            if self.as_inputs:
                self._new_inputs.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
            else:
                nodes.append(constant_node(tensor))
        inputs = [tensor.name for tensor in tensors]
        nodes.append(helper.make_node("DequantizeLinear", inputs, [dq_name], name=prefix + "/DequantizeLinear", **attributes))
        return nodes


def _split_matmul(node, dq_names: list[str]) -> list:
    """MatMul(x, W) -> Concat(MatMul(x, W_0), MatMul(x, W_1), ...) along the last axis, same output name."""
    from onnx import helper

    parts = []
    for number, dq_name in enumerate(dq_names):
        parts.append(helper.make_node("MatMul", [node.input[0], dq_name], [f"{node.output[0]}/part{number}"],
                                      name=f"{node.name or node.output[0]}/part{number}"))
    parts.append(helper.make_node("Concat", [part.output[0] for part in parts], [node.output[0]], axis=-1,
                                  name=f"{node.name or node.output[0]}/concat"))
    return parts


def constant_node(tensor):
    from onnx import helper

    return helper.make_node("Constant", [], [tensor.name], name=tensor.name + "_const", value=tensor)
