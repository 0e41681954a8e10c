"""Fold trained adapters into base weights, in numpy: the maths of every merged export (ONNX and GGUF).

Device side: numpy only. The manifest's `trainable` table says which base weight each tensor adapts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bundle import BundleManifest
from .errors import BundleError


@dataclass
class AdaptedModule:
    """The trained tensors that adapt one linear layer."""

    base_weight: str
    lora_A: np.ndarray | None = None
    lora_B: np.ndarray | None = None
    magnitude: np.ndarray | None = None


def adapted_modules(manifest: dict, adapter: dict[str, np.ndarray]) -> dict[str, AdaptedModule]:
    """Group the adapter's tensors by the HF weight they adapt (role `full` tensors are left out)."""
    modules: dict[str, AdaptedModule] = {}
    for entry in BundleManifest.of(manifest).trainable:
        if entry["role"] == "full":
            continue
        module = modules.setdefault(entry["base_weight"], AdaptedModule(entry["base_weight"]))
        setattr(module, {"lora_A": "lora_A", "lora_B": "lora_B", "magnitude": "magnitude"}[entry["role"]], adapter[entry["name"]])
    return modules


def full_replacements(manifest: dict, adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF parameter name -> trained tensor, for fully trained modules (`modules_to_save`)."""
    replacements = {}
    for entry in BundleManifest.of(manifest).trainable:
        if entry["role"] == "full":
            hf_name = entry["name"].removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
            replacements[hf_name] = adapter[entry["name"]]
    return replacements


def merge_weights(manifest: dict, template_weights: dict[str, np.ndarray], adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fold the adapter into the base weights: HF parameter name -> merged weight in its initializer layout.

    `template_weights` maps HF parameter names to the base weights as stored in the inference template
    (layout from manifest['inference']['weights']). With s = manifest['adapter']['scale']:
      LoRA: W' = W + s * B @ A
      DoRA: V = W + s * B @ A;  W' = m[:, None] * V / ||V||_row  (norm over the input dim, per output row,
            as PEFT's DoraLinearLayer.get_weight_norm; m is the magnitude vector)
    W, B @ A and m are all in the [out, in] view; an `in_out` initializer is transposed back on return.
    """
    manifest = BundleManifest.of(manifest)
    scale = float(manifest.adapter["scale"])
    layouts = manifest.inference["weights"]
    merged = {}
    for hf_name, module in adapted_modules(manifest, adapter).items():
        if hf_name not in template_weights:
            raise BundleError(f"the inference template has no weight {hf_name} to merge into", hint="prepare the bundle again")
        layout = layouts[hf_name]["layout"]
        stored = template_weights[hf_name]
        base = stored if layout == "out_in" else stored.T
        merged_out_in = merge_one(base, module, scale)
        merged[hf_name] = merged_out_in if layout == "out_in" else np.ascontiguousarray(merged_out_in.T)
    for hf_name, tensor in full_replacements(manifest, adapter).items():
        if hf_name in layouts:
            merged[hf_name] = tensor if layouts[hf_name]["layout"] == "out_in" else np.ascontiguousarray(tensor.T)
    return merged


def merge_one(base: np.ndarray, module: AdaptedModule, scale: float) -> np.ndarray:
    """The merged [out, in] weight of one module from its [out, in] base weight."""
    if module.lora_A is None or module.lora_B is None:
        raise BundleError(f"the adapter of {module.base_weight} lacks lora_A or lora_B", hint="prepare the bundle again")
    if module.magnitude is None and not np.any(module.lora_B):
        return base.copy()  # B = 0 (a fresh adapter): the merged weight is the base weight, bit for bit
    compute_dtype = np.float64 if module.magnitude is not None else np.float32
    delta = module.lora_B.astype(compute_dtype) @ module.lora_A.astype(compute_dtype)
    if module.magnitude is None:
        return (base.astype(np.float32) + np.float32(scale) * delta.astype(np.float32)).astype(base.dtype)
    combined = base.astype(np.float64) + scale * delta
    row_norm = np.linalg.norm(combined, axis=1)
    return (module.magnitude.astype(np.float64)[:, None] / row_norm[:, None] * combined).astype(base.dtype)


def dora_output_scale(base: np.ndarray, module: AdaptedModule, scale: float) -> np.ndarray:
    """DoRA's per-output-row factor m / ||W + s B A||_row, so that x W'^T = factor * (x W^T + s x A^T B^T).

    An unmerged (onnx-adapter) export serves DoRA with this vector and the plain LoRA product.
    """
    delta = module.lora_B.astype(np.float64) @ module.lora_A.astype(np.float64)
    row_norm = np.linalg.norm(base.astype(np.float64) + scale * delta, axis=1)
    return (module.magnitude.astype(np.float64) / row_norm).astype(np.float32)
