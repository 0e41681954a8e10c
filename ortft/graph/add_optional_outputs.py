"""Give LayerNormalization and Dropout nodes the optional outputs ORT's gradient builders read.

torch's exporter leaves off LayerNormalization's mean / inverse-std-dev outputs and Dropout's mask;
ORT's gradient builders index those outputs and fail ("i < node_->OutputDefs().size()"). Adding
the outputs (with fresh names, unused by the forward graph) lets the gradient graph build.
"""

from __future__ import annotations

from .base import GraphPass, PassResult

WANTED_OUTPUTS = {"LayerNormalization": 3, "Dropout": 2}


class AddOptionalOutputs(GraphPass):
    def call(self, model) -> PassResult:
        count = 0
        for index, node in enumerate(model.graph.node):
            wanted = WANTED_OUTPUTS.get(node.op_type)
            if wanted is None or node.domain not in ("", "ai.onnx"):
                continue
            while len(node.output) < wanted:
                node.output.append(f"{node.name or node.op_type + str(index)}_optional_output_{len(node.output)}")
                count += 1
        return PassResult(model, count > 0, count)
