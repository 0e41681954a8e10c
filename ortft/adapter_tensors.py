"""Adapter tensors from files and messages ortft did not make itself: read, convert and check them.

`read_safetensors` parses a .safetensors file itself (header size capped, every offset and size checked
against the file; no pickle, nothing executed), so a damaged or hostile file is a clean error naming it.
Adapters (`--init-adapter`, checkpoints, exports' inputs, federated replies) must hold float32 or float16
tensors (bfloat16 is converted to float32, with a note), all finite; `require_adapter_fits` checks that an
adapter has exactly the bundle's trainable tensors with their shapes.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import RunError

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 << 20  # an adapter of 10,000 tensors has a header of ~1 MB
# safetensors dtype -> (numpy dtype or None for bfloat16, bytes per element)
DTYPES = {
    "F64": (np.float64, 8), "F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (None, 2),
    "I64": (np.int64, 8), "I32": (np.int32, 4), "I16": (np.int16, 2), "I8": (np.int8, 1),
    "U64": (np.uint64, 8), "U32": (np.uint32, 4), "U16": (np.uint16, 2), "U8": (np.uint8, 1), "BOOL": (np.bool_, 1),
}
ADAPTER_DTYPES = ("F32", "F16", "BF16")


@dataclass
class StoredTensor:
    """One tensor of a safetensors file: its dtype name, shape and raw little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview


def read_safetensors(path: Path | str, error: type[Exception] = RunError,
                     max_header_bytes: int = MAX_HEADER_BYTES) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file, every size and offset checked; `error` names the file."""
    path = Path(path)

    def bad(reason: str) -> Exception:
        return error(f"{path} is not a readable safetensors file: {reason}", hint="use a file written by ortft or by safetensors' save")

    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(0)
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise bad("it is shorter than a header")
            header_bytes = struct.unpack("<Q", prefix)[0]
            if header_bytes > max_header_bytes or header_bytes > size - 8:
                raise bad(f"its header claims {header_bytes} bytes (at most {min(max_header_bytes, size - 8)} possible)")
            header = handle.read(header_bytes)
            data = memoryview(handle.read())
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}", hint="check the path") from exc
    try:
        table = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"its header is not JSON ({exc.__class__.__name__})") from exc
    if not isinstance(table, dict):
        raise bad("its header is not a JSON object")
    metadata = table.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise bad("its __metadata__ is not an object of strings")
    tensors = {}
    for name, facts in table.items():
        tensors[name] = _stored_tensor(name, facts, data, bad)
    return tensors, metadata


def _stored_tensor(name: str, facts, data: memoryview, bad) -> StoredTensor:
    if not isinstance(facts, dict):
        raise bad(f"the entry of {name!r} is not an object")
    dtype, shape, offsets = facts.get("dtype"), facts.get("shape"), facts.get("data_offsets")
    if dtype not in DTYPES:
        raise bad(f"tensor {name!r} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    needed = math.prod(shape) * DTYPES[dtype][1]
    if not 0 <= begin <= end <= len(data) or end - begin != needed:
        raise bad(f"tensor {name!r} claims bytes {begin}..{end} of {len(data)} for a {dtype} tensor of shape {shape} ({needed} bytes)")
    return StoredTensor(dtype, tuple(shape), data[begin:end])


def as_float32(name: str, tensor: StoredTensor, where: str, error: type[Exception] = RunError) -> np.ndarray:
    """An adapter tensor as float32: float32 as is, float16 exactly, bfloat16 exactly (its bits shifted into
    float32's); any other dtype is refused."""
    if tensor.dtype not in ADAPTER_DTYPES:
        raise error(f"{where}: tensor {name} is {tensor.dtype}; adapter tensors must be float32 or float16 (bfloat16 is converted)",
                    hint="save the adapter in float32")
    if tensor.dtype == "BF16":
        bits = np.frombuffer(tensor.data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(tensor.shape)
    dtype = np.dtype(DTYPES[tensor.dtype][0]).newbyteorder("<")
    return np.frombuffer(tensor.data, dtype=dtype).astype(np.float32).reshape(tensor.shape)


def require_finite(name: str, value: np.ndarray, where: str, error: type[Exception] = RunError) -> None:
    if not np.isfinite(value).all():
        bad = "NaN" if np.isnan(value).any() else "an infinite value"
        raise error(f"{where}: tensor {name} holds {bad}", hint="use adapter weights from a run that did not diverge")


def float32_tensors(tensors: dict[str, StoredTensor], where: str, error: type[Exception] = RunError) -> dict[str, np.ndarray]:
    """Every tensor as a finite float32 array (float16/bfloat16 converted); a note when bfloat16 was converted."""
    arrays = {}
    for name, tensor in tensors.items():
        arrays[name] = as_float32(name, tensor, where, error)
        require_finite(name, arrays[name], where, error)
    converted = sum(tensor.dtype == "BF16" for tensor in tensors.values())
    if converted:
        log.warning("note: %s holds %d bfloat16 tensors; converted to float32 (exactly)", where, converted)
    return arrays


def read_adapter_file(path: Path | str, error: type[Exception] = RunError) -> dict[str, np.ndarray]:
    """A safetensors adapter (graph names -> finite float32 arrays), or `error` naming the file."""
    tensors, _metadata = read_safetensors(path, error)
    return float32_tensors(tensors, str(path), error)


def require_adapter_fits(expected: dict[str, list[int]], adapter: dict[str, np.ndarray], where: str,
                         error: type[Exception] = RunError, hint: str | None = None) -> None:
    """`adapter` has exactly the `expected` tensors ({name: shape}) with those shapes, float32/float16, finite."""
    problems = [f"{name} missing" for name in expected if name not in adapter]
    problems += [f"{name} is not one of the bundle's trainable tensors" for name in adapter if name not in expected]
    for name, shape in expected.items():
        value = adapter.get(name)
        if value is None:
            continue
        value = np.asarray(value)
        if list(value.shape) != list(shape):
            problems.append(f"{name} has shape {list(value.shape)}, expected {list(shape)}")
        elif value.dtype not in (np.float32, np.float16):
            problems.append(f"{name} is {value.dtype}, expected float32")
        elif not np.isfinite(value).all():
            problems.append(f"{name} holds NaN or an infinite value")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise error(f"{where} does not fit the bundle: {shown}", hint=hint or "use an adapter of a run trained on this bundle")

