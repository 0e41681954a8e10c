"""Run one stage's graph passes in order on a model loaded once, saved once, counting what each changed.

A stage is an ordered list of GraphPass instances (ortft/prepare/artifacts.py builds prepare's: the loss
graph before the gradient builder, then the training and the eval graph after it); adding a pass to a
stage is one line in its list. `PassManager(stage, passes).run(model)` applies them to an in-memory
onnx.ModelProto; `.run_file(path)` loads the graph without its external data, applies them and saves it
once (only if a pass changed it). `counts` is {pass name: count} (the manifest's `passes` record) and
`results` keeps each pass's PassResult (its `details`, e.g. LowerTrainingOps' {op type: count}).
"""

from __future__ import annotations

import logging
from pathlib import Path

from .base import GraphPass, PassResult

log = logging.getLogger(__name__)


class PassManager:
    """The passes of one stage, run in the order given; a pass listed as None is skipped (a switched-off option)."""

    def __init__(self, stage: str, passes: list[GraphPass | None]):
        self.stage = stage
        self.passes = [graph_pass for graph_pass in passes if graph_pass is not None]
        names = [graph_pass.name for graph_pass in self.passes]
        if len(set(names)) != len(names):
            raise ValueError(f"stage {stage} lists a pass twice: {names}")
        self.results: dict[str, PassResult] = {}

    @property
    def counts(self) -> dict[str, int]:
        return {name: result.count for name, result in self.results.items()}

    def count(self, pass_name: str) -> int:
        """What the pass of that name changed in this stage; 0 if it did not run."""
        result = self.results.get(pass_name)
        return result.count if result is not None else 0

    def details(self, pass_name: str) -> dict:
        """The details the pass of that name reported; {} if it did not run."""
        result = self.results.get(pass_name)
        return dict(result.details) if result is not None else {}

    def find(self, pass_name: str) -> GraphPass | None:
        """The stage's pass of that name (for its settings), or None."""
        return next((graph_pass for graph_pass in self.passes if graph_pass.name == pass_name), None)

    def run(self, model) -> bool:
        """Apply every pass to `model` in place; True if any changed it."""
        for graph_pass in self.passes:
            result = graph_pass.call(model)
            self.results[graph_pass.name] = result
            log.debug("%s: %s changed %d", self.stage, graph_pass.name, result.count)
        return any(result.modified for result in self.results.values())

    def run_file(self, path: Path) -> bool:
        """Load the graph at `path` (external data left where it is), run the stage, save it once if changed."""
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        modified = self.run(model)
        if modified:
            onnx.save_model(model, str(path))
        return modified
