"""The bundle's initial adapter: initial_adapter.safetensors plus the trainable tensors that start at zero.

prepare leaves out of the file every trainable tensor whose starting value is all zeros (LoRA's B
matrices: half of SmolLM2's r=16 file) and names them in the manifest's `initial_adapter_zeros`;
`read_initial_adapter` puts them back as exact float32 zeros. A bundle without the key holds every
tensor in the file, as before.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ZEROS_KEY = "initial_adapter_zeros"  # manifest key: graph names of the trainable tensors that start at zero


def split_zero_tensors(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """(the tensors to store, the names of those whose every value is +0.0, bit for bit), both in `arrays`' order."""
    stored, zeros = {}, []
    for name, value in arrays.items():
        value = np.ascontiguousarray(value, dtype=np.float32)
        if value.size and not value.view(np.uint32).any():
            zeros.append(name)
        else:
            stored[name] = value
    return stored, zeros


def zero_tensor_shapes(manifest: dict, where: str) -> dict[str, list[int]]:
    """{name: shape} of the trainable tensors the manifest says start at zero; a name that is not a trainable
    tensor, or one listed twice, is a BundleError naming `where`."""
    from .errors import BundleError

    names = manifest.get(ZEROS_KEY) or []
    shapes = {entry["name"]: entry["shape"] for entry in manifest["trainable"]}
    unknown = [name for name in names if name not in shapes]
    if unknown:
        raise BundleError(f"{where}: {ZEROS_KEY} names {unknown[0]!r}, which is not a trainable tensor of the bundle",
                          hint="prepare the bundle again")
    if len(set(names)) != len(names):
        raise BundleError(f"{where}: {ZEROS_KEY} lists a tensor twice", hint="prepare the bundle again")
    return {name: shapes[name] for name in names}


def with_zero_tensors(stored: dict[str, np.ndarray], zero_shapes: dict[str, list[int]], where: str) -> dict[str, np.ndarray]:
    """`stored` plus a float32 zero tensor for each name of `zero_shapes`; a name also stored is a BundleError."""
    from .errors import BundleError

    both = [name for name in zero_shapes if name in stored]
    if both:
        raise BundleError(f"{where}: tensor {both[0]} is stored although the manifest's {ZEROS_KEY} says it starts at zero",
                          hint="prepare the bundle again")
    arrays = dict(stored)
    for name, shape in zero_shapes.items():
        arrays[name] = np.zeros(shape, dtype=np.float32)
    return arrays


def read_initial_adapter(bundle_dir: Path | str, manifest: dict) -> dict[str, np.ndarray]:
    """Every trainable tensor's starting value, keyed by graph name, float32: the file's tensors and the
    manifest's zeros (not checked against the manifest's trainable set: `load_parameters` does that)."""
    from .adapter import load_adapter
    from .bundle import INITIAL_ADAPTER

    path = Path(bundle_dir) / INITIAL_ADAPTER
    zero_shapes = zero_tensor_shapes(manifest, str(Path(bundle_dir) / "manifest.json"))
    return with_zero_tensors(load_adapter(path), zero_shapes, str(path))


def initial_parameters(bundle_dir: Path | str, manifest: dict) -> dict[str, np.ndarray]:
    """`read_initial_adapter`, exactly the manifest's trainable tensors with their shapes, in its order."""
    from .bundle import INITIAL_ADAPTER
    from .runtime import fit_parameters

    shapes = {entry["name"]: entry["shape"] for entry in manifest["trainable"]}
    return fit_parameters(read_initial_adapter(bundle_dir, manifest), list(shapes), shapes,
                          str(Path(bundle_dir) / INITIAL_ADAPTER))
