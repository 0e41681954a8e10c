"""Lower the training-only ops of a bundle folder's two graphs, in place (`ortft upgrade` on a device).

Needs onnx and numpy only. Returns, per graph file, what `LowerTrainingOps` rewrote (for the manifest).
Then `PortableOps` (ortft/graph/portable_ops.py) rewrites what OpenVINO's provider mishandles.
`ortft prepare` runs the same passes as the last ones of its training and eval graph stages instead.
"""

from __future__ import annotations

from pathlib import Path

GRAPH_FILES = ("training_model.onnx", "eval_model.onnx")


def lower_training_graphs(folder: Path) -> dict:
    """Rewrite each graph in `folder` that holds training-only ops; {graph file: {op type: count}}."""
    from .lower_training_ops import LowerTrainingOps
    from .pipeline import PassManager
    from .portable_ops import PortableOps

    lowered = {}
    for file_name in GRAPH_FILES:
        stage = PassManager(file_name, [LowerTrainingOps(), PortableOps()])
        stage.run_file(Path(folder) / file_name)
        lowered[file_name] = stage.results["LowerTrainingOps"].details
    return lowered
