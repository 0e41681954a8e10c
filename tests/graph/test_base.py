"""Tests of ortft/graph/base.py's shared look-ups on a tiny hand-built graph."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ortft.graph.base import (
    consumers_of,
    float_initializer_bytes,
    names_in_use,
    producers_of,
    unique_name,
)


def _graph():
    nodes = [
        helper.make_node("Dropout", ["x"], ["h", ""], name="drop"),
        helper.make_node("MatMul", ["h", "W"], ["y"], name="mm"),
        helper.make_node("Add", ["y", "h"], ["z"], name="add"),
    ]
    initializers = [numpy_helper.from_array(np.zeros((2, 3), np.float32), "W"),
                    numpy_helper.from_array(np.zeros(4, np.float16), "half"),
                    numpy_helper.from_array(np.zeros(5, np.int64), "ints")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3])], initializers)
    return helper.make_model(graph)


def test_producers_and_consumers():
    graph = _graph().graph
    producers = producers_of(graph)
    assert {name: node.name for name, node in producers.items()} == {"h": "drop", "y": "mm", "z": "add"}
    assert "" not in producers  # an optional output left empty names no tensor
    assert [node.name for node in consumers_of(graph)["h"]] == ["mm", "add"]


def test_unique_names_avoid_every_name_of_the_graph():
    taken = names_in_use(_graph().graph)
    assert {"x", "h", "y", "z", "W", "half", "ints", "drop", "mm"} <= taken
    assert unique_name("fresh", taken) == "fresh"
    assert unique_name("h", taken) == "h_1"
    assert unique_name("h", taken) == "h_2" and "h_2" in taken


def test_float_initializer_bytes_counts_float_initializers_not_excluded():
    model = _graph()
    assert float_initializer_bytes(model, set()) == 2 * 3 * 4 + 4 * 2
    assert float_initializer_bytes(model, {"W"}) == 4 * 2
