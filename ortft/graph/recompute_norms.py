"""`RecomputeNorms`: an RMS norm's output computed again for the backward pass from what its gradient keeps.

The LoRA A gradients read the norms' outputs (the adapters' inputs); recomputing them as
x * inv_std * scale frees two [tokens, hidden] tensors per decoder layer at the peak. The cloning and
where clones sit are in ortft/graph/recompute.py.
"""

from __future__ import annotations

from .recompute import RECOMPUTE_SUFFIX, RecomputeForBackward


class RecomputeNorms(RecomputeForBackward):
    """Recompute an RMS norm's output as x * inv_std * scale from the tensors its own gradient keeps.

    Not as a clone of the norm: ORT's session optimizer merges a clone of SimplifiedLayerNormalization
    back into the original (the same op on the same inputs), which undid the saving. Two Muls give the
    same values to within rounding (the kernel divides by the root mean square, this multiplies by its
    inverse). SmolLM2-135M (scripts/bench.py): peak RSS 2214 -> 2068 MB at 4 x 256, 2049 -> 1891 MB on
    the chat batches, the same step time.
    """

    def __init__(self):
        super().__init__(lambda node: node.op_type == "SimplifiedLayerNormalization" and node.domain in ("", "com.microsoft"))

    def recompute_inputs(self, node) -> list[str] | None:
        attributes = {attribute.name: attribute for attribute in node.attribute}
        axis = attributes["axis"].i if "axis" in attributes else -1
        if axis != -1 or len(node.input) != 2 or len(node.output) < 2 or not node.output[1]:
            return None  # the inverse standard deviation is needed, per row of the last axis
        return [node.input[0], node.output[1], node.input[1]]

    def build(self, node, inputs: list[str], output: str) -> list:
        from onnx import helper

        x, inv_std, scale = inputs
        base = node.name or node.output[0]
        unscaled = output + "_unscaled"
        return [helper.make_node("Mul", [x, inv_std], [unscaled], name=base + "_unscaled" + RECOMPUTE_SUFFIX),
                helper.make_node("Mul", [unscaled, scale], [output], name=base + RECOMPUTE_SUFFIX)]
