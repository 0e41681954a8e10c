"""Switch Dropout off in an evaluation graph: its training_mode input becomes a constant False.

A graph exported in training mode carries Dropout(training_mode=True); the eval graph that ORT
derives from it would still drop activations, so eval losses would be noisy and not match PyTorch.
"""

from __future__ import annotations

from .base import GraphPass, PassResult

FALSE_NAME = "ortft_dropout_training_mode_false"


class DisableDropout(GraphPass):
    def call(self, model) -> PassResult:
        from onnx import TensorProto, helper

        count = 0
        for node in model.graph.node:
            if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx"):
                continue
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = FALSE_NAME
            count += 1
        if count and not any(init.name == FALSE_NAME for init in model.graph.initializer):
            model.graph.initializer.append(helper.make_tensor(FALSE_NAME, TensorProto.BOOL, [], [False]))
        return PassResult(model, count > 0, count)
