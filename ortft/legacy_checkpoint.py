"""Read the ORT training-API checkpoints of bundles and runs made before ortft trained on stock onnxruntime.

An ORT checkpoint is a flatbuffer (schema `onnxruntime/core/flatbuffers/schema/ort_training_checkpoint.fbs`):
the module state (trainable and frozen tensors), optimizer groups (step count, learning rate and two
momentum tensors per parameter for AdamW), and a property bag. onnxruntime's wheels ship the generated
Python readers for it (onnxruntime.tools.ort_format_model), with the `flatbuffers` package they depend
on, so stock onnxruntime reads these files without the training build. Tensors of large checkpoints sit
in `checkpoint.data` beside the file, at the offset the tensor records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import RunError

_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64, 7: np.int64, 6: np.int32}  # ONNX TensorProto types
FILE_IDENTIFIER = b"ODTC"


@dataclass
class OrtCheckpoint:
    trainable: dict[str, np.ndarray]
    frozen: dict[str, np.ndarray]
    step: int = 0
    moments: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def optimizer_state(self) -> tuple[dict[str, np.ndarray], int] | None:
        """AdamW's moments in ortft's names (`exp_avg/NAME`, `exp_avg_sq/NAME`) and the step; None if absent."""
        if not self.moments:
            return None
        state = {}
        for name, (first, second) in self.moments.items():
            state[f"exp_avg/{name}"] = first
            state[f"exp_avg_sq/{name}"] = second
        return state, self.step


def _fbs():
    try:
        from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.Checkpoint import Checkpoint
    except ImportError as exc:  # an onnxruntime build without its tools folder
        raise RunError("this onnxruntime has no reader for ORT training checkpoints",
                       hint="install the stock onnxruntime package, or prepare and train anew") from exc
    return Checkpoint


def _tensor(tensor, data_path: Path) -> tuple[str, np.ndarray]:
    name = tensor.Name().decode("utf-8")
    dtype = _DTYPES.get(tensor.DataType())
    if dtype is None:
        raise RunError(f"ORT checkpoint tensor {name} has data type {tensor.DataType()}, which ortft does not read")
    dims = [int(tensor.Dims(i)) for i in range(tensor.DimsLength())]
    count = int(np.prod(dims)) if dims else 1
    if tensor.RawDataLength() > 0:
        data = np.frombuffer(tensor.RawDataAsNumpy().tobytes(), dtype=dtype)
    else:
        offset = tensor.ExternalDataOffset()
        if offset < 0 or not data_path.is_file():
            raise RunError(f"ORT checkpoint tensor {name} has no data", hint="the checkpoint is damaged")
        with open(data_path, "rb") as handle:
            handle.seek(offset)
            data = np.frombuffer(handle.read(count * np.dtype(dtype).itemsize), dtype=dtype)
    if data.size != count:
        raise RunError(f"ORT checkpoint tensor {name} holds {data.size} values for shape {dims}", hint="the checkpoint is damaged")
    return name, data.reshape(dims).copy()


def read_ort_checkpoint(path: Path | str) -> OrtCheckpoint:
    """Every tensor and the AdamW state of an ORT training checkpoint file (a RunError if it is damaged)."""
    path = Path(path)
    try:
        return _read(path)
    except RunError:
        raise
    except Exception as exc:  # flatbuffers reads past the end or into garbage: struct/index/unicode errors
        raise RunError(f"{path} is a damaged ORT training checkpoint ({exc.__class__.__name__})",
                       hint="use another checkpoint") from exc


def _read(path: Path) -> OrtCheckpoint:
    buffer = bytearray(path.read_bytes())
    checkpoint_class = _fbs()
    if len(buffer) < 8 or not checkpoint_class.CheckpointBufferHasIdentifier(buffer, 0):
        raise RunError(f"{path} is not an ORT training checkpoint", hint="the file is damaged or of another kind")
    root = checkpoint_class.GetRootAs(buffer, 0)
    data_path = path.with_name(path.name + ".data")
    module = root.ModuleState()
    trainable, frozen = {}, {}
    if module is not None:
        for index in range(module.RequiresGradParamsLength()):
            name, value = _tensor(module.RequiresGradParams(index), data_path)
            trainable[name] = value
        for index in range(module.FrozenParamsLength()):
            name, value = _tensor(module.FrozenParams(index), data_path)
            frozen[name] = value
    result = OrtCheckpoint(trainable, frozen)
    for group_index in range(root.OptimizerGroupsLength()):
        group = root.OptimizerGroups(group_index)
        result.step = int(group.Step())
        for state_index in range(group.OptimizerStatesLength()):
            state = group.OptimizerStates(state_index)
            name = state.ParamName().decode("utf-8")
            momentums = dict(_tensor(state.Momentums(i), data_path) for i in range(state.MomentumsLength()))
            if {"momentum0", "momentum1"} <= set(momentums):
                result.moments[name] = (momentums["momentum0"], momentums["momentum1"])
            elif len(momentums) == 2:
                first, second = momentums.values()
                result.moments[name] = (first, second)
    return result
