"""Lower the training-only ops of a bundle folder's two graphs, in place (prepare, and `ortft upgrade` on a device).

Needs onnx and numpy only. Returns, per graph file, what `LowerTrainingOps` rewrote (for the manifest).
Then `PortableOps` (ortft/graph/portable_ops.py) rewrites what OpenVINO's provider mishandles.
"""

from __future__ import annotations

from pathlib import Path

GRAPH_FILES = ("training_model.onnx", "eval_model.onnx")


def lower_training_graphs(folder: Path) -> dict:
    """Rewrite each graph in `folder` that holds training-only ops; {graph file: {op type: count}}."""
    import onnx

    from .lower_training_ops import LowerTrainingOps
    from .portable_ops import PortableOps

    lowered = {}
    for file_name in GRAPH_FILES:
        path = Path(folder) / file_name
        graph = onnx.load(str(path), load_external_data=False)
        lowering = LowerTrainingOps()
        result = lowering.call(graph)
        lowered[file_name] = dict(lowering.lowered)
        portable = PortableOps().call(graph)
        if result.modified or portable.modified:
            onnx.save_model(graph, str(path))
        del graph
    return lowered
