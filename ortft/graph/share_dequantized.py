"""Keep ORT from dequantizing one weight once per reader: a DequantizeLinear read by several nodes gets one reader.

When a session loads, ORT's `EnsureUniqueDQForNodeUnit` transformer (graph optimisation level 1, part
of its QDQ handling) gives every reader of a DequantizeLinear its own copy of it, so the weight is
dequantized once per reader and step. With `--quantize-embeddings` the tied SmolLM2 table (49152 x 576)
is read by the embedding Gather and by every LM-head slice, forward and backward: ~17 dequantizations
of 113 MB per step, ~50 ms each, 1.26 s of a 2.4 s step at 1 x 128.

This pass puts `Flatten(DQ, axis=1)` between such a DequantizeLinear of a 2-D weight and its readers.
On a 2-D tensor Flatten changes nothing and ORT runs it on the same buffer (no copy); as the single
reader it keeps the transformer from duplicating. Not a Reshape: ORT's QDQ propagation moves a
DequantizeLinear across Reshape (and Transpose, Squeeze, Unsqueeze, Slice) and then duplicates it after
all. Measured on that bundle (int4 with embeddings, 1 x 128, 2 alternating pairs): 51-56 -> 86 tokens/s,
the same losses, peak RSS 807-810 -> 817-828 MB.
"""

from __future__ import annotations

from .base import GraphPass, PassResult, consumers_of

SHARED_SUFFIX = "_shared"


class ShareDequantized(GraphPass):
    """Give each DequantizeLinear of a 2-D initializer that several nodes read one no-op Flatten reader."""

    def call(self, model) -> PassResult:
        from onnx import helper

        graph = model.graph
        consumers = consumers_of(graph)
        ranks = {tensor.name: len(tensor.dims) for tensor in graph.initializer}
        rewritten = []
        count = 0
        for node in graph.node:
            rewritten.append(node)
            if node.op_type != "DequantizeLinear":
                continue
            output = node.output[0]
            readers = list({id(reader): reader for reader in consumers.get(output, [])}.values())
            if len(readers) < 2 or ranks.get(node.input[0]) != 2:
                continue  # one reader is never duplicated; Flatten keeps only a 2-D weight as it is
            shared = f"{output}{SHARED_SUFFIX}"
            rewritten.append(helper.make_node("Flatten", [output], [shared], name=f"{node.name}{SHARED_SUFFIX}", axis=1))
            for reader in readers:
                for index, name in enumerate(reader.input):
                    if name == output:
                        reader.input[index] = shared
            count += 1
        if count:
            del graph.node[:]
            graph.node.extend(rewritten)
        return PassResult(model, bool(count), count)
