"""Run graphs with the training build of onnxruntime (the reference kernels) and with this process's own.

The training build (onnxruntime-training-cpu 1.19.2) lives in the gradient builder's venv
(`ortft.prepare.gradient_env.gradient_python()`) and can never share an environment with stock
onnxruntime: `run_reference` / `run_reference_many` run graphs there, in one subprocess (feeds and
outputs through .npz files; reference_worker.py). `run_local` runs a graph with whichever onnxruntime
this process has (stock after the switch).

`EXACT_CONFIG` keeps both builds from trading precision for speed: with the default accuracy level (4),
ORT fuses DequantizeLinear + MatMul into MatMulNBits that quantizes the activations to int8 (1.19.2 for
int4 weights, 1.32 for int4 and int8): losses move ~1e-4 and gradients ~1e-2 relative.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("reference_worker.py")
EXACT_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}


class ReferenceError(RuntimeError):
    """The training build could not run a graph (its message says why)."""


def reference_python() -> str:
    from ortft.prepare.gradient_env import gradient_python

    return str(gradient_python())


def run_reference(model, feeds: dict, names: list[str] | None = None, config: dict | None = None) -> dict[str, np.ndarray]:
    """Outputs `names` (default: all) of `model` (a path, or a ModelProto without external data) run by
    the training build on `feeds`; {name: array}. Raises ReferenceError if ORT fails."""
    result = run_reference_many([(model, feeds, names)], config)[0]
    if isinstance(result, ReferenceError):
        raise result
    return result


def run_reference_many(jobs: list, config: dict | None = None) -> list:
    """run_reference for each (model, feeds, names) in one subprocess: a dict per job, or a ReferenceError."""
    with tempfile.TemporaryDirectory(prefix="ortft-reference-") as scratch:
        scratch = Path(scratch)
        specs, all_names = [], []
        for index, (model, feeds, names) in enumerate(jobs):
            names = list(names) if names else _output_names(model)
            np.savez(scratch / f"feeds{index}.npz", **feeds)
            specs.append({"model": str(_model_path(model, scratch, index)), "feeds": str(scratch / f"feeds{index}.npz"),
                          "out": str(scratch / f"out{index}.npz"), "names": names, "config": config or {}})
            all_names.append(names)
        (scratch / "jobs.json").write_text(json.dumps(specs), encoding="utf-8")
        result = subprocess.run([reference_python(), str(WORKER), str(scratch / "jobs.json")],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ReferenceError(f"the reference worker failed:\n{result.stderr[-3000:]}")
        return [_read_outputs(scratch / f"out{index}.npz", names) for index, names in enumerate(all_names)]


def build_training_graph(loss_graph: Path, directory: Path, requires_grad: list[str]) -> Path:
    """ORT's gradient builder (the training build) on `loss_graph`: returns directory/training_model.onnx."""
    directory.mkdir(parents=True, exist_ok=True)
    jobs = directory / "generate.json"
    jobs.write_text(json.dumps([{"generate": str(loss_graph), "directory": str(directory),
                                 "requires_grad": list(requires_grad)}]), encoding="utf-8")
    result = subprocess.run([reference_python(), str(WORKER), str(jobs)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ReferenceError(f"ORT's gradient builder failed:\n{result.stderr[-3000:]}")
    return directory / "training_model.onnx"


def run_local(model, feeds: dict, names: list[str] | None = None, config: dict | None = None) -> dict[str, np.ndarray]:
    """The same with this process's onnxruntime (one thread)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    names = list(names) if names else [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _read_outputs(path: Path, names: list[str]):
    with np.load(path) as loaded:
        if "error" in loaded.files:
            return ReferenceError(str(loaded["error"]))
        return {name: loaded[f"out{index}"] for index, name in enumerate(names)}


def _model_path(model, scratch: Path, index: int) -> Path:
    if isinstance(model, (str, Path)):
        return Path(model)
    path = scratch / f"model{index}.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _output_names(model) -> list[str]:
    import onnx

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model), load_external_data=False)
    return [output.name for output in model.graph.output]
