"""ONNX graph passes, one job per class, each in a file named after it: `PassClass().call(model) -> PassResult`.

Passes edit an onnx.ModelProto in place and say whether and how much they changed; a PassManager
(pipeline.py) runs one stage's passes in order on a graph loaded and saved once.
"""

from .base import GraphPass, PassResult
from .pipeline import PassManager

__all__ = ["GraphPass", "PassManager", "PassResult"]
