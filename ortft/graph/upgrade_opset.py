"""Convert a graph to a newer default-domain opset with onnx's version converter, weights left in place.

Bumping `opset_import` alone is wrong (e.g. Reduce* ops take their axes as an input from opset 18),
so the converter rewrites the nodes. It copies the whole model, so it gets a shell without the
initializers (declared as typed graph inputs instead); the converted nodes, inputs, outputs and
opsets then replace the original ones and the initializers never move.
"""

from __future__ import annotations

from .base import GraphPass, PassResult


def default_opset(model) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)


class UpgradeOpset(GraphPass):
    def __init__(self, target: int):
        self.target = target

    def call(self, model) -> PassResult:
        import onnx
        from onnx import helper, version_converter

        if default_opset(model) >= self.target:
            return PassResult(model, False, 0)
        graph = model.graph
        declared = {value.name for value in graph.input}
        weights = [(t.name, t.data_type, list(t.dims)) for t in graph.initializer if t.name not in declared]
        shell = onnx.ModelProto()
        shell.ir_version = model.ir_version
        shell.opset_import.extend(model.opset_import)
        shell.graph.name = graph.name
        shell.graph.node.extend(graph.node)
        shell.graph.input.extend(graph.input)
        shell.graph.input.extend(helper.make_tensor_value_info(*weight) for weight in weights)
        shell.graph.output.extend(graph.output)
        shell.graph.value_info.extend(graph.value_info)
        converted = version_converter.convert_version(shell, self.target)
        added = {name for name, _, _ in weights}
        for field in ("node", "input", "output", "value_info"):
            values = [v for v in getattr(converted.graph, field) if field != "input" or v.name not in added]
            del getattr(graph, field)[:]
            getattr(graph, field).extend(values)
        del model.opset_import[:]
        model.opset_import.extend(converted.opset_import)
        model.ir_version = max(model.ir_version, converted.ir_version)
        return PassResult(model, True, 1)
