"""Write the frozen-prefix cache's graphs into a bundle whose adapters start above layer 0 (issue 26).

`ortft train` runs the prefix graph once per example row and keeps its output (ortft/prefix_cache.py);
later epochs run only the suffix graphs. The graphs are cut from the bundle's finished training and eval
graphs (ortft/graph/prefix_split.py) and read the bundle's weight files: no weight is stored twice.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..graph.prefix_split import HIDDEN_STATES, split_prefix
from ..bundle import EVAL_GRAPH, TRAINING_GRAPH

log = logging.getLogger(__name__)

PREFIX_GRAPH = "prefix_model.onnx"
SUFFIX_TRAINING_GRAPH = "suffix_training_model.onnx"
SUFFIX_EVAL_GRAPH = "suffix_eval_model.onnx"


def write_prefix_cache_graphs(bundle_dir: Path, task: str, adapter_layers: list[int], hidden_size: int,
                              trainable: list[dict]) -> dict | None:
    """Write the prefix and suffix graphs next to the bundle's graphs; returns the manifest's
    `prefix_cache` section, or None when there is no frozen prefix to cache (adapters in layer 0, a
    classification task, or graphs whose layers the split cannot find)."""
    import onnx

    first_adapted = min(adapter_layers) if adapter_layers else 0
    if task != "causal-lm" or first_adapted < 1:
        return None
    training = onnx.load(str(bundle_dir / TRAINING_GRAPH), load_external_data=False)
    evaluation = onnx.load(str(bundle_dir / EVAL_GRAPH), load_external_data=False)
    split = split_prefix(training, evaluation, first_adapted, hidden_size, {entry["name"] for entry in trainable})
    del training, evaluation
    if split is None:
        log.warning("no frozen-prefix cache: the graphs show no single hidden state entering layer %d", first_adapted)
        return None
    for model, name in ((split.prefix, PREFIX_GRAPH), (split.suffix_training, SUFFIX_TRAINING_GRAPH),
                        (split.suffix_eval, SUFFIX_EVAL_GRAPH)):
        onnx.save_model(model, str(bundle_dir / name))
    return {
        "prefix_graph": PREFIX_GRAPH,
        "training_graph": SUFFIX_TRAINING_GRAPH,
        "eval_graph": SUFFIX_EVAL_GRAPH,
        "layers": first_adapted,
        "hidden_size": hidden_size,
        "hidden_states": HIDDEN_STATES,
        "dtype": "float32",
        "boundary": split.boundary,
        "prefix_nodes": split.prefix_nodes,
        "suffix_training_nodes_removed": split.suffix_training_nodes_removed,
    }
