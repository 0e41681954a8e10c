"""A bundle's adapter weights: the trainable tensors keyed by graph name, as files and as checked arrays.

Read (`load_adapter`, through ortft/adapter_tensors.py's own safetensors parser), written
(`adapter_bytes`: float32 safetensors), checked against the bundle's trainable tensors (`check_adapter`),
and `--init-adapter`'s file (`read_initial_adapter`). Checkpoints (ortft/run.py), exports, federated
rounds and prepare's initial adapter all go through here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import BundleManifest
from .errors import ConfigError, RunError


def adapter_bytes(arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file of float32 tensors (with `metadata` in its header)."""
    from safetensors.numpy import save

    return save({name: np.ascontiguousarray(value, dtype=np.float32) for name, value in arrays.items()}, metadata=metadata)


def load_adapter(path: Path | str) -> dict[str, np.ndarray]:
    """Adapter weights keyed by graph name, as float32, from a safetensors file: float32 or float16 tensors
    (bfloat16 converted, with a note), finite; anything else (a damaged file, another dtype, NaN) is a RunError
    naming the file (ortft/adapter_tensors.py)."""
    from .adapter_tensors import read_adapter_file

    return read_adapter_file(path)


def check_adapter(manifest: dict, adapter: dict[str, np.ndarray], where: str = "the adapter") -> None:
    """`adapter` holds exactly the manifest's trainable tensors, with their shapes, finite (ortft/adapter_tensors.py)."""
    from .adapter_tensors import require_adapter_fits

    require_adapter_fits(BundleManifest.of(manifest).trainable_shapes, adapter, where, RunError,
                         hint="export a checkpoint of a run trained on this bundle")


def read_initial_adapter(manifest: dict, path: Path) -> dict[str, np.ndarray]:
    """`--init-adapter`: a safetensors file holding exactly the bundle's trainable tensors, finite float32/float16
    (bfloat16 converted); checked before the run folder is made, so a bad file leaves nothing behind."""
    if not Path(path).is_file():
        raise ConfigError(f"--init-adapter {path} is not a file", hint="pass the adapter.safetensors of a run or of `ortft export --format adapter`")
    adapter = load_adapter(path)
    check_adapter(manifest, adapter, where=str(path))
    return adapter
