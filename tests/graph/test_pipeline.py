"""Tests of ortft/graph/pipeline.py: a stage runs its passes in order on a graph loaded and saved once."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from ortft.graph.base import GraphPass, PassResult
from ortft.graph.disable_dropout import DisableDropout
from ortft.graph.pipeline import PassManager


def _dropout_graph():
    nodes = [helper.make_node("Dropout", ["x"], ["y"], name="drop")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class _Record(GraphPass):
    """Appends its label to `seen` and reports `count` changes."""

    def __init__(self, label: str, seen: list, count: int):
        self.label, self.seen, self.count = label, seen, count

    @property
    def name(self) -> str:
        return self.label

    def call(self, model) -> PassResult:
        self.seen.append((self.label, len(model.graph.node)))
        return PassResult(model, self.count > 0, self.count, {"label": self.label})


def test_passes_run_in_order_and_their_counts_are_recorded_by_name():
    seen = []
    stage = PassManager("stage", [_Record("first", seen, 0), None, DisableDropout(), _Record("last", seen, 3)])
    assert stage.run(_dropout_graph())
    assert seen == [("first", 1), ("last", 1)]  # None (a switched-off pass) is skipped
    assert stage.counts == {"first": 0, "DisableDropout": 1, "last": 3}
    assert list(stage.counts) == ["first", "DisableDropout", "last"]
    assert stage.count("absent") == 0 and stage.details("absent") == {}
    assert stage.details("last") == {"label": "last"}
    assert isinstance(stage.find("DisableDropout"), DisableDropout) and stage.find("absent") is None


def test_a_stage_that_changes_nothing_reports_so():
    stage = PassManager("stage", [_Record("only", [], 0)])
    assert not stage.run(_dropout_graph())


def test_a_pass_listed_twice_under_one_name_is_refused():
    with pytest.raises(ValueError, match="twice"):
        PassManager("stage", [DisableDropout(), DisableDropout()])


def test_run_file_loads_once_and_saves_once_only_when_changed(tmp_path, monkeypatch):
    path = tmp_path / "g.onnx"
    onnx.save_model(_dropout_graph(), str(path))
    loads, saves = [], []
    real_load, real_save = onnx.load, onnx.save_model
    monkeypatch.setattr(onnx, "load", lambda *args, **kwargs: loads.append(args[0]) or real_load(*args, **kwargs))
    monkeypatch.setattr(onnx, "save_model", lambda *args, **kwargs: saves.append(args[1]) or real_save(*args, **kwargs))
    seen = []
    assert PassManager("g", [_Record("a", seen, 0), DisableDropout(), _Record("b", seen, 0)]).run_file(path)
    assert loads == [str(path)] and saves == [str(path)]
    assert [node.input[2] for node in real_load(str(path)).graph.node] == ["ortft_dropout_training_mode_false"]
    assert not PassManager("g", [_Record("a", seen, 0)]).run_file(path)
    assert len(loads) == 2 and len(saves) == 1  # nothing changed: not written again
