"""BlockedAttention: the chunked forward and recomputing backward equal full causal attention and its
gradients (numpy reference), for any row count, chunk size, padding, grouping and sliding window; and
no [seq, seq] tensor is made."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ortft.graph.blocked_attention import (
    ATEN_DOMAIN,
    BACKWARD_OPERATOR,
    FORWARD_OPERATOR,
    BlockedAttention,
    gradient_definitions,
    placeholder_operator,
)

LOWEST = np.finfo(np.float32).min
ROOT = Path(__file__).resolve().parents[2]


def placeholder_model(heads: int, kv_heads: int, head_dim: int, scaling: float, window: int = 0,
                      backward: bool = True, wanted: tuple = ("query", "key", "value"), opset: int = 17):
    """A graph of the two placeholders as ORT's builder leaves them: inputs q, k, v, mask, dO."""
    constants = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, dtype)))
                 for name, value, dtype in (("scaling", scaling, np.float32), ("window", window, np.int64),
                                            ("groups", heads // kv_heads, np.int64))]
    inputs = ["q", "k", "v", "mask", "scaling", "window", "groups"]
    nodes = constants + [helper.make_node("ATen", inputs, ["out"], domain=ATEN_DOMAIN, operator=FORWARD_OPERATOR)]
    grads = [f"d{name[0]}" if name in wanted else "" for name in ("query", "key", "value")]
    if backward:
        nodes.append(helper.make_node("ATen", ["dout"] + inputs + ["out"], grads, domain=ATEN_DOMAIN,
                                      operator=BACKWARD_OPERATOR))
    f = TensorProto.FLOAT
    graph_inputs = [helper.make_tensor_value_info("q", f, ["b", heads, "s", head_dim]),
                    helper.make_tensor_value_info("k", f, ["b", kv_heads, "s", head_dim]),
                    helper.make_tensor_value_info("v", f, ["b", kv_heads, "s", head_dim]),
                    helper.make_tensor_value_info("mask", TensorProto.INT64, ["b", "s"])]
    outputs = [helper.make_tensor_value_info("out", f, ["b", "s", heads, head_dim])]
    if backward:
        graph_inputs.append(helper.make_tensor_value_info("dout", f, ["b", "s", heads, head_dim]))
        outputs += [helper.make_tensor_value_info(name, f, [None] * 4) for name in grads if name]
    graph = helper.make_graph(nodes, "attention", graph_inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(ATEN_DOMAIN, 1)])


def replaced(model, chunk_rows: int):
    result = BlockedAttention(chunk_rows).call(model)
    assert result.modified and result.count == 1
    assert not [node for node in model.graph.node if placeholder_operator(node)]
    assert not [node for node in model.graph.node if node.op_type == "Constant" and node.output[0] in ("scaling", "window", "groups")]
    del model.opset_import[1:]  # nothing of the ATen domain is left
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model, feeds: dict) -> dict:
    from ortft.runtime import onnxruntime_module

    session = onnxruntime_module().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [value.name for value in session.get_outputs()]
    return dict(zip(names, session.run(None, {value.name: feeds[value.name] for value in session.get_inputs()})))


def reference(q, k, v, mask, dout, scaling: float, window: int = 0) -> dict:
    """Full causal attention as transformers' eager attention computes it, and its gradients (float64)."""
    q, k, v, dout = (x.astype(np.float64) for x in (q, k, v, dout))
    groups = q.shape[1] // k.shape[1]
    k_full, v_full = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    length = q.shape[2]
    rows, columns = np.arange(length)[:, None], np.arange(length)[None, :]
    allowed = (columns <= rows) & ((columns > rows - window) if window else True)
    allowed = allowed[None, None] & mask.astype(bool)[:, None, None, :]
    scores = q @ k_full.transpose(0, 1, 3, 2) * scaling + np.where(allowed, 0.0, LOWEST)
    scores -= scores.max(axis=-1, keepdims=True)
    probabilities = np.exp(scores)
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    out = probabilities @ v_full  # [b, h, s, d]
    grad_out = dout.transpose(0, 2, 1, 3)
    grad_v = probabilities.transpose(0, 1, 3, 2) @ grad_out
    grad_p = grad_out @ v_full.transpose(0, 1, 3, 2)
    grad_s = probabilities * (grad_p - (grad_p * probabilities).sum(axis=-1, keepdims=True)) * scaling
    grad_q = grad_s @ k_full
    grad_k = grad_s.transpose(0, 1, 3, 2) @ q

    def per_kv_head(x):
        return x.reshape(x.shape[0], -1, groups, *x.shape[2:]).sum(axis=2)

    return {"out": out.transpose(0, 2, 1, 3), "dq": grad_q, "dk": per_kv_head(grad_k), "dv": per_kv_head(grad_v)}


def feeds_for(batch, heads, kv_heads, length, head_dim, padding=(), seed=0) -> dict:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, length), dtype=np.int64)
    for row, (left, right) in enumerate(padding):
        mask[row, :left] = 0
        mask[row, length - right:] = 0
    return {"q": rng.standard_normal((batch, heads, length, head_dim)).astype(np.float32),
            "k": rng.standard_normal((batch, kv_heads, length, head_dim)).astype(np.float32),
            "v": rng.standard_normal((batch, kv_heads, length, head_dim)).astype(np.float32),
            "mask": mask, "dout": rng.standard_normal((batch, length, heads, head_dim)).astype(np.float32)}


def without_blind_rows(feeds: dict, window: int = 0) -> dict:
    """`feeds` with a zero output gradient on the query rows that see no key (padding, or a padded row's
    window): eager attention spreads them uniformly over all keys, the chunks over their own keys, and
    nothing reads them (padding carries no label, and no other row attends to a padding key)."""
    length = feeds["mask"].shape[1]
    rows, columns = np.arange(length)[:, None], np.arange(length)[None, :]
    allowed = (columns <= rows) & ((columns > rows - window) if window else True)
    blind = ~(allowed[None] & feeds["mask"].astype(bool)[:, None, :]).any(axis=-1)  # [b, s]
    dout = feeds["dout"].copy()
    dout[blind] = 0.0
    return dict(feeds, dout=dout, blind=blind)


def assert_close(got: dict, want: dict, names=("out", "dq", "dk", "dv"), rel: float = 1e-5, blind=None) -> None:
    if blind is not None:
        got, want = (dict(values, out=np.where(blind[:, :, None, None], 0.0, values["out"])) for values in (got, want))
    for name in names:
        assert got[name].shape == want[name].shape, name
        error = np.linalg.norm(got[name] - want[name]) / np.linalg.norm(want[name])
        assert error < rel, f"{name}: relative L2 error {error:.2e}"


@pytest.mark.parametrize("length, chunk_rows", [(1, 4), (5, 16), (16, 4), (37, 8), (37, 10), (64, 64), (100, 7)])
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (6, 2), (3, 3)])
def test_equals_full_attention_and_its_gradients(length, chunk_rows, heads, kv_heads):
    scaling = 8 ** -0.5
    model = replaced(placeholder_model(heads, kv_heads, 8, scaling), chunk_rows)
    feeds = feeds_for(2, heads, kv_heads, length, 8, padding=[(0, 0), (0, min(3, length - 1))])
    names = ("out", "dq", "dk", "dv") if length > 1 else ("out", "dv")  # one key: the scores get no gradient
    assert_close(run(model, feeds), reference(**{k: feeds[k] for k in ("q", "k", "v", "mask", "dout")}, scaling=scaling),
                 names)


@pytest.mark.parametrize("window, length, chunk_rows", [(4, 30, 8), (2, 9, 4), (16, 40, 5), (50, 40, 8)])
def test_sliding_window(window, length, chunk_rows):
    model = replaced(placeholder_model(4, 2, 8, 0.3, window=window), chunk_rows)
    feeds = without_blind_rows(feeds_for(2, 4, 2, length, 8, padding=[(0, 2), (0, 0)], seed=3), window)
    assert_close(run(model, feeds), reference(**{k: feeds[k] for k in ("q", "k", "v", "mask", "dout")}, scaling=0.3,
                                              window=window), blind=feeds["blind"])


def test_left_padding_and_a_row_of_padding_stay_finite():
    """Rows whose keys are all padding get a uniform distribution (as eager attention gives them), not
    NaN; every other row and every gradient is exact."""
    model = replaced(placeholder_model(4, 2, 8, 0.25), 4)
    feeds = without_blind_rows(feeds_for(3, 4, 2, 13, 8, padding=[(5, 0), (0, 0), (13, 0)], seed=5))
    got = run(model, feeds)
    assert all(np.isfinite(value).all() for value in got.values())
    assert_close(got, reference(**{k: feeds[k] for k in ("q", "k", "v", "mask", "dout")}, scaling=0.25),
                 blind=feeds["blind"])


@pytest.mark.parametrize("wanted", [("query",), ("value",), ("key", "value"), ("query", "key")])
def test_only_the_gradients_something_reads(wanted):
    model = replaced(placeholder_model(4, 2, 8, 0.3, wanted=wanted), 4)
    loops = [node for node in model.graph.node if node.op_type == "Loop"]
    assert len(loops) == 2  # forward and backward
    feeds = feeds_for(1, 4, 2, 11, 8, seed=7)
    want = reference(**{k: feeds[k] for k in ("q", "k", "v", "mask", "dout")}, scaling=0.3)
    assert_close(run(model, feeds), want, names=["out"] + [f"d{name[0]}" for name in wanted])


def test_eval_graph_forward_only_and_older_opsets():
    model = replaced(placeholder_model(4, 2, 8, 0.3, backward=False, opset=14), 4)
    assert [node.op_type for node in model.graph.node].count("Loop") == 1
    assert "LessOrEqual" not in {node.op_type for loop in model.graph.node if loop.op_type == "Loop"
                                 for node in loop.attribute[0].g.node}  # opset 16's op, written as Not(Greater)
    feeds = feeds_for(2, 4, 2, 9, 8, padding=[(0, 1), (0, 0)], seed=9)
    want = reference(**{k: feeds[k] for k in ("q", "k", "v", "mask", "dout")}, scaling=0.3)
    assert_close(run(model, feeds), want, names=["out"])


def test_gradient_definition_makes_the_backward_placeholder():
    (definition,) = gradient_definitions()
    assert definition["key"] == f"{ATEN_DOMAIN}::ATen::{FORWARD_OPERATOR}::"
    (node,) = definition["nodes"]
    assert node["attributes"]["operator"]["value"] == BACKWARD_OPERATOR
    assert node["inputs"][0] == "GO(0)" and node["inputs"][-1] == "O(0)" and node["outputs"] == ["GI(0)", "GI(1)", "GI(2)"]
    json.dumps(definition)  # travels to the gradient builder's process as JSON


def test_no_seq_by_seq_tensor_is_made(tmp_path):
    """8192 rows, 4 heads: full scores would be 1 GiB (and the graph would keep them for the backward
    pass); chunks of 256 rows need ~32 MiB each. Peak RSS of a fresh process running forward and
    backward stays far below one [heads, seq, seq] tensor."""
    model = replaced(placeholder_model(4, 2, 16, 0.25), 256)
    path = tmp_path / "attention.onnx"
    onnx.save(model, str(path))
    script = textwrap.dedent(f"""
        import resource, sys
        import numpy as np
        sys.path.insert(0, {str(ROOT)!r})
        from ortft.runtime import onnxruntime_module
        ort = onnxruntime_module()
        options = ort.SessionOptions()
        options.enable_mem_pattern = False
        session = ort.InferenceSession({str(path)!r}, options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        n = 8192
        feeds = {{"q": rng.standard_normal((1, 4, n, 16), dtype=np.float32),
                  "k": rng.standard_normal((1, 2, n, 16), dtype=np.float32),
                  "v": rng.standard_normal((1, 2, n, 16), dtype=np.float32),
                  "mask": np.ones((1, n), dtype=np.int64),
                  "dout": rng.standard_normal((1, n, 4, 16), dtype=np.float32)}}
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        outputs = session.run(None, feeds)
        assert all(np.isfinite(x).all() for x in outputs)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    grown_mb = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert grown_mb < 400, f"running attention over 8192 rows grew peak RSS by {grown_mb:.0f} MB"


def test_the_products_keep_query_groups_as_a_batch_axis():
    """Queries sharing a key head are a batch axis of their own (keys and values broadcast along it), so
    a chunk's products have batch x heads items, not batch x key heads: 3 key heads on 2 threads split
    unevenly. The key and value gradients are summed over that axis afterwards."""
    model = replaced(placeholder_model(heads=6, kv_heads=2, head_dim=4, scaling=0.5), chunk_rows=3)
    bodies = {node.name: next(attribute.g for attribute in node.attribute if attribute.name == "body")
              for node in model.graph.node if node.op_type == "Loop"}
    assert len(bodies) == 2
    inferred = onnx.shape_inference.infer_shapes(model)
    for body in (attribute.g for node in inferred.graph.node if node.op_type == "Loop" for attribute in node.attribute):
        ranks = {value.name: len(value.type.tensor_type.shape.dim) for value in list(body.value_info) + list(body.output)
                 if value.type.tensor_type.HasField("shape")}
        products = [node for node in body.node if node.op_type == "MatMul"]
        assert products and all(ranks.get(node.output[0]) == 5 for node in products), \
            [(node.name, ranks.get(node.output[0])) for node in products]
    backward = next(body for name, body in bodies.items() if "Grad" in name)
    sums = [node for node in backward.node if node.op_type == "ReduceSum"]
    assert {node.output[0].rsplit("/", 1)[-1].rsplit("_", 1)[0] for node in sums} == {"key_grad", "value_grad"}
