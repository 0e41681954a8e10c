"""Adapters as Flower ArrayRecords, their example-weighted mean, and what they cost on the wire.

Adapters are dicts of graph name -> float32 array (the manifest's trainable tensors), the same
mapping `ortft.run.write_checkpoint` and `ortft.run.load_adapter` use.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def weighted_mean(adapters: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """sum_i (w_i / W) * adapter_i, in the order given (float32, as FedAvg computes it)."""
    if not adapters or len(adapters) != len(weights):
        raise ValueError("need one weight per adapter, and at least one adapter")
    total = float(sum(weights))
    result: dict[str, np.ndarray] = {}
    for adapter, weight in zip(adapters, weights):
        factor = weight / total
        for name, value in adapter.items():
            term = np.asarray(value, dtype=np.float32) * factor
            result[name] = term if name not in result else result[name] + term
    return result


def to_array_record(adapter: dict[str, np.ndarray]):
    """An ArrayRecord holding the adapter (keys: graph names), in manifest order."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({name: Array(np.ascontiguousarray(value, dtype=np.float32)) for name, value in adapter.items()})


def from_array_record(record) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(array.numpy(), dtype=np.float32) for name, array in record.items()}


def payload_bytes(record) -> int:
    """Raw bytes of the tensors an ArrayRecord carries (the adapter's numbers, without any framing)."""
    return int(sum(array.numpy().nbytes for array in record.values()))


def wire_bytes(obj) -> int:
    """Bytes of a Message (or a record) as Flower ships it: every object of its tree (message, records, array chunks),
    deflated as Flower serializes them. That is the adapter plus Flower's framing (names, shapes, config)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return int(sum(len(obj.deflate()) for obj in get_all_nested_objects(obj).values()))


def adapter_sha256(adapter: dict[str, np.ndarray]) -> str:
    """A digest of the adapter's numbers (by name: name, shape, float32 bytes): the same global adapter gives the
    same digest in memory, in a round record and in a checkpoint's adapter.safetensors."""
    digest = hashlib.sha256()
    for name in sorted(adapter):
        value = np.ascontiguousarray(adapter[name], dtype="<f4")
        digest.update(f"{name}\0{value.shape}\0".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def adapter_nbytes(adapter: dict[str, np.ndarray]) -> int:
    return int(sum(np.asarray(value).nbytes for value in adapter.values()))


def initial_adapter(bundle: Path | str, manifest: dict) -> tuple[dict[str, np.ndarray], int]:
    """The bundle's initial adapter (what every run starts from), and the bytes of the base model's
    frozen weights (frozen_weights.data; estimated from the parameter count where it is absent)."""
    from ..initial_adapter import initial_parameters

    adapter = initial_parameters(bundle, manifest)
    frozen = int((manifest.get("frozen_weights") or {}).get("bytes", 0))
    if frozen == 0:
        frozen = int(manifest.model.get("num_parameters", 0)) * 4
    return adapter, frozen
