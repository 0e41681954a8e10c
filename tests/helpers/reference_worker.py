"""Runs ONNX graphs with the training build of onnxruntime (the gradient builder's venv); a standalone script.

    python reference_worker.py JOBS.json

JOBS.json is a list of {"model": path, "feeds": .npz path, "out": .npz path, "names": [output names]
(empty: all outputs), "config": {session config key: value}}. Each job writes its outputs to its "out"
file as out0, out1, ... or, if ORT fails, an "error" entry with the message. A job {"generate": loss
graph path, "directory": path, "requires_grad": [names]} runs ORT's gradient builder instead
(training_model.onnx and eval_model.onnx in the directory), as ortft prepare does. Imports only numpy and
onnxruntime (never ortft or torch): it runs with `ortft.prepare.gradient_env.gradient_python()`, where
the training build's kernels (SliceGrad, GatherGrad, InPlaceAccumulatorV2, ...) serve as the reference.
One process runs many graphs: starting Python and importing ORT costs more than a tiny graph's run.
"""

import json
import sys


def run_job(onnxruntime, np, job):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    for key, value in (job.get("config") or {}).items():
        options.add_session_config_entry(key, value)
    with np.load(job["feeds"]) as loaded:
        feeds = {name: loaded[name] for name in loaded.files}
    try:
        session = onnxruntime.InferenceSession(job["model"], options, providers=["CPUExecutionProvider"])
        names = job.get("names") or [output.name for output in session.get_outputs()]
        values = session.run(names, feeds)
    except Exception as error:  # noqa: BLE001  (any ORT failure is reported to the caller, which decides)
        np.savez(job["out"], error=np.array(f"{type(error).__name__}: {error}"))
        return
    np.savez(job["out"], **{f"out{index}": np.asarray(value) for index, value in enumerate(values)})


def generate_job(job):
    """ORT's artifact generator without the optimizer graph; `onnxruntime.training` imports the PyTorch
    front end, so a bare namespace package stands in for it (as ortft/prepare/gradient_worker.py does)."""
    import importlib.util
    import os
    import types

    spec = importlib.util.find_spec("onnxruntime")
    namespace = types.ModuleType("onnxruntime.training")
    namespace.__path__ = [os.path.join(next(iter(spec.submodule_search_locations)), "training")]
    sys.modules.setdefault("onnxruntime.training", namespace)
    sys.modules.setdefault("onnxruntime.training.ortmodule", None)
    from onnxruntime.training import artifacts

    artifacts.generate_artifacts(job["generate"], requires_grad=job["requires_grad"], frozen_params=[], loss=None,
                                 optimizer=None, artifact_directory=job["directory"])


def main(argv):
    import numpy as np
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    with open(argv[1], encoding="utf-8") as handle:
        jobs = json.load(handle)
    for job in jobs:
        if "generate" in job:
            generate_job(job)
        else:
            run_job(onnxruntime, np, job)


if __name__ == "__main__":
    main(sys.argv)
