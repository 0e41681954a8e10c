"""ONNX graph passes, one job per class: `PassClass().call(model) -> PassResult(model, modified)`.

Passes edit an onnx.ModelProto in place and say whether they changed anything.
"""

from .base import GraphPass, PassResult

__all__ = ["GraphPass", "PassResult"]
