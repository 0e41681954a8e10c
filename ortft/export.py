"""`ortft export`: pick a run's checkpoint, check it against its bundle, and write one export format.

Formats (each in its own module where it has one):
- merged-onnx: the adapter folded into the base model, one ONNX model with KV cache, with config.json,
  the tokenizer and genai_config.json at its root (Optimum and onnxruntime-genai load it as it is);
  optionally re-quantized (export_quantize.py);
- onnx-adapter: the base model with the adapters as graph inputs and one `adapters/NAME.onnx_adapter`
  per run (export_adapter_onnx.py);
- gguf / gguf-lora: llama.cpp's files (export_gguf.py);
- peft: a folder `PeftModel.from_pretrained` loads; adapter: the raw adapter tensors.

Device side: numpy, onnx, safetensors (and gguf for the GGUF formats). Every output folder is staged
and renamed into place.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .adapter import check_adapter, load_adapter
from .bundle import TOKENIZER_DIR, BundleManifest
from .config import LATEST_CHECKPOINT, ExportConfig, default_of
from .errors import BundleError, ConfigError, RunError
from .export_files import generation_config, write_serving_files  # noqa: F401  (generation_config: part of the API)
from .export_manifest import EXPORT_FORMAT, EXPORT_FORMAT_VERSION, write_export_manifest  # noqa: F401  (part of the API)
from .fsutil import check_output_dir, staged_dir, write_bytes_atomic, write_json_atomic
from .inference_template import InferenceTemplate
from .manifest import load_verified, manifest_digest, verify_files
from .merge import AdaptedModule, adapted_modules, full_replacements, merge_weights  # noqa: F401  (part of the API)
from .run import RunCheckpoint, resolve_run_checkpoint  # noqa: F401  (RunCheckpoint: part of the API)

EXPORT_KINDS = ("merged-onnx", "onnx-adapter", "gguf", "gguf-lora", "peft", "adapter")
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
ADAPTER_FILE = "adapter.safetensors"
INT8_SESSION_CONFIG = {"session.disable_quant_qdq": "1"}


# ---- the exports ---------------------------------------------------------------------------------


def export_merged_onnx(bundle_dir: Path | str, manifest: dict, adapter: dict[str, np.ndarray], out_dir: Path | str, force: bool = False,
                       source: dict | None = None, quantize: str | None = None, block_size: int | None = None) -> dict:
    """EXPORT_DIR/{model.onnx, model.onnx.data, config.json, tokenizer files, chat_template.jinja,
    generation_config.json, genai_config.json, manifest.json}.

    The template's base weights are replaced by merged ones; everything else is copied byte for byte.
    With `quantize` ("int8" | "int4"), every linear weight of the template (merged or not; not the
    embedding table nor a tied head) is re-quantized (ortft/export_quantize.py) and the export
    manifest's `quantization` section records scheme, bytes and per-layer errors.
    Returns the export manifest.
    """
    from .export_quantize import check_quantize_options

    block_size = check_quantize_options(quantize, block_size)
    bundle_dir = Path(bundle_dir)
    check_adapter(manifest, adapter)
    template = open_template(bundle_dir, manifest)
    base_names = {module.base_weight for module in adapted_modules(manifest, adapter).values()}
    base_names |= set(full_replacements(manifest, adapter))
    merged = merge_weights(manifest, template.read_weights(base_names), adapter)
    with staged_dir(Path(out_dir), force) as staging:
        extra = {"inference": inference_facts(manifest)}
        if quantize:
            extra["quantization"] = _write_quantized(template, staging, merged, quantize, block_size)
        else:
            template.write_merged(staging, merged, MODEL_FILE, DATA_FILE)
        session_config = INT8_SESSION_CONFIG if quantize == "int8" else None
        serving = write_serving_files(staging, bundle_dir, manifest, MODEL_FILE, session_config)
        extra["tokenizer"] = serving["tokenizer"]
        if serving["notes"]:
            extra["notes"] = serving["notes"]
        return write_export_manifest(staging, "merged-onnx", bundle_dir, manifest, source, extra=extra)


def open_template(bundle_dir: Path, manifest: dict) -> InferenceTemplate:
    """The bundle's inference template, after checking the files an export reads against the manifest."""
    template = InferenceTemplate(bundle_dir, manifest)
    relative = [path.relative_to(bundle_dir).as_posix() for path in template.files()]
    config = (BundleManifest.of(manifest).inference or {}).get("config")
    verify_bundle_files(bundle_dir, manifest, [*relative, *([config] if config else [])], prefixes=(f"{TOKENIZER_DIR}/",))
    return template


def _write_quantized(template: InferenceTemplate, out_dir: Path, merged: dict[str, np.ndarray], scheme: str, block_size: int | None) -> dict:
    """model.onnx + model.onnx.data with the linear weights re-quantized (ortft/export_quantize.py);
    returns the export manifest's `quantization` section."""
    from .export_quantize import QuantizedExportWriter

    template.by_initializer(merged)  # a tied head cannot be merged: same refusal as without --quantize
    writer = QuantizedExportWriter(template, scheme, block_size)
    section = writer.write(out_dir, merged, MODEL_FILE, DATA_FILE)
    section["model_bytes_before"] = sum(path.stat().st_size for path in template.files())
    section["model_bytes_after"] = sum((out_dir / name).stat().st_size for name in (MODEL_FILE, DATA_FILE))
    return section


def export_peft(manifest: dict, adapter: dict[str, np.ndarray], out_dir: Path | str, force: bool = False, source: dict | None = None) -> dict:
    """EXPORT_DIR/{adapter_config.json, adapter_model.safetensors}: loads with `PeftModel.from_pretrained`."""
    from safetensors.numpy import save

    manifest = BundleManifest.of(manifest)
    check_adapter(manifest, adapter)
    peft_tensors = {entry["peft_key"]: np.ascontiguousarray(adapter[entry["name"]]) for entry in manifest.trainable}
    with staged_dir(Path(out_dir), force) as staging:
        write_json_atomic(staging / "adapter_config.json", peft_adapter_config(manifest))
        write_bytes_atomic(staging / "adapter_model.safetensors", save(peft_tensors, metadata={"format": "pt"}))
        return write_export_manifest(staging, "peft", None, manifest, source)


def export_adapter(manifest: dict, adapter: dict[str, np.ndarray], out_dir: Path | str, force: bool = False, source: dict | None = None) -> dict:
    """EXPORT_DIR/{adapter.safetensors (graph names), manifest.json (adapter settings and tensor table)}."""
    from safetensors.numpy import save

    manifest = BundleManifest.of(manifest)
    check_adapter(manifest, adapter)
    tensors = {name: np.ascontiguousarray(adapter[name]) for name in manifest.trainable_names}
    with staged_dir(Path(out_dir), force) as staging:
        write_bytes_atomic(staging / ADAPTER_FILE, save(tensors))
        extra = {"adapter": manifest.get("adapter"), "trainable": manifest.trainable}
        return write_export_manifest(staging, "adapter", None, manifest, source, extra=extra)


def export_run(run_dir: Path | str, out_dir: Path | str, checkpoint: str = LATEST_CHECKPOINT, kind: str = default_of(ExportConfig, "format"), force: bool = False,
               quantize: str | None = None, block_size: int | None = None, adapter_name: str | None = None,
               gguf_type: str | None = None) -> dict:
    """`ortft export`: pick the run's checkpoint, check it against the bundle, write one export kind.

    `quantize` / `block_size` re-quantize a merged-onnx export's linear weights (int8 | int4);
    `adapter_name` names an onnx-adapter export's adapter (default: the run folder's name);
    `gguf_type` is a gguf export's weight type (f32 | f16 | q8_0).
    """
    from .export_quantize import check_quantize_options

    if kind not in EXPORT_KINDS:
        raise RunError(f"unknown export format {kind!r}", hint=f"use one of: {', '.join(EXPORT_KINDS)}")
    _check_options_fit(kind, quantize, block_size, adapter_name, gguf_type)
    check_quantize_options(quantize, block_size)
    if kind != "onnx-adapter":  # an onnx-adapter folder may exist already: its adapter is added to it
        check_output_dir(Path(out_dir), force)
    chosen = resolve_run_checkpoint(run_dir, checkpoint)
    manifest = load_verified(chosen.bundle_dir)  # the loader gate (ortft/trust.py): every file the export reads
    adapter = load_adapter(chosen.adapter_path)
    check_adapter(manifest, adapter, where=str(chosen.adapter_path))
    source = {  # names, not host paths: the export travels (the sha256 identifies the bundle)
        "run": Path(run_dir).resolve().name,
        "checkpoint": _relative_to_run(run_dir, chosen.checkpoint_dir or chosen.adapter_path),
        "bundle": chosen.bundle_dir.resolve().name,
        "bundle_manifest_sha256": manifest_digest(chosen.bundle_dir),
    }
    if manifest.is_classifier and kind not in ("peft", "adapter"):
        from .export_classifier import export_classifier  # merged-onnx with the classifier head; the rest refused

        return export_classifier(kind, chosen.bundle_dir, manifest, adapter, out_dir, force, source, quantize)
    if kind == "merged-onnx":
        return export_merged_onnx(chosen.bundle_dir, manifest, adapter, out_dir, force, source, quantize=quantize, block_size=block_size)
    if kind == "onnx-adapter":
        from .export_adapter_onnx import export_onnx_adapter

        name = adapter_name or Path(run_dir).resolve().name
        return export_onnx_adapter(chosen.bundle_dir, manifest, adapter, out_dir, name, force, source)
    if kind == "gguf":
        from .export_gguf import DEFAULT_GGUF_TYPE, export_gguf

        return export_gguf(chosen.bundle_dir, manifest, adapter, out_dir, gguf_type or DEFAULT_GGUF_TYPE, force, source)
    if kind == "gguf-lora":
        from .export_gguf import export_gguf_lora

        return export_gguf_lora(chosen.bundle_dir, manifest, adapter, out_dir, force, source)
    if kind == "peft":
        return export_peft(manifest, adapter, out_dir, force, source)
    return export_adapter(manifest, adapter, out_dir, force, source)


def _relative_to_run(run_dir: Path | str, path: Path) -> str:
    """A checkpoint as the export manifest records it: relative to its run (checkpoints/step-N), else its name."""
    try:
        return Path(path).resolve().relative_to(Path(run_dir).resolve()).as_posix()
    except ValueError:
        return Path(path).name


def _check_options_fit(kind: str, quantize: str | None, block_size: int | None, adapter_name: str | None, gguf_type: str | None) -> None:
    """Each format-specific option belongs to one format: refuse it with any other."""
    if (quantize or block_size is not None) and kind != "merged-onnx":
        hint = "for GGUF, use --gguf-type q8_0" if kind == "gguf" else "drop --quantize (the adapter stays float32), or export --format merged-onnx"
        raise ConfigError(f"--quantize and --block-size apply to --format merged-onnx only, not {kind}", hint=hint)
    if adapter_name is not None and kind != "onnx-adapter":
        raise ConfigError(f"--adapter-name applies to --format onnx-adapter only, not {kind}", hint="drop --adapter-name")
    if gguf_type is not None and kind != "gguf":
        raise ConfigError(f"--gguf-type applies to --format gguf only, not {kind}",
                          hint="drop --gguf-type (a gguf-lora adapter is float32)" if kind == "gguf-lora" else "drop --gguf-type")


# ---- the pieces of an export ---------------------------------------------------------------------


def peft_adapter_config(manifest: dict) -> dict:
    """adapter_config.json with the keys of PEFT's LoraConfig that describe this adapter."""
    manifest = BundleManifest.of(manifest)
    settings = manifest.adapter
    alpha = float(settings["alpha"])
    modules_to_save = list(settings.get("modules_to_save") or []) or None
    return {
        "peft_type": "LORA",
        "task_type": settings.get("task_type") or ("CAUSAL_LM" if manifest.task == "causal-lm" else "SEQ_CLS"),
        "base_model_name_or_path": manifest.source.get("path"),
        "revision": None,
        "inference_mode": True,
        "r": int(settings["rank"]),
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": float(settings.get("dropout", 0.0)),
        "target_modules": list(settings["targets"]),
        "exclude_modules": None,
        "layers_to_transform": _layers_to_transform(manifest),
        "layers_pattern": None,
        "use_dora": settings["type"] == "dora",
        "use_rslora": bool(settings.get("rslora", False)),
        "modules_to_save": modules_to_save,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_bias": False,
    }


def _layers_to_transform(manifest: dict) -> list[int] | None:
    settings = manifest.adapter
    if "layers_to_transform" in settings:
        return settings["layers_to_transform"]
    layers = settings.get("layers")
    total = manifest.model.get("num_layers")
    if layers is None or (total is not None and list(layers) == list(range(total))):
        return None
    return list(layers)


def inference_facts(manifest: dict) -> dict:
    section = BundleManifest.of(manifest).inference
    return {key: section[key] for key in ("inputs", "outputs", "num_layers", "num_key_value_heads", "head_dim") if key in section}


def verify_bundle_files(bundle_dir: Path, manifest: dict, relative_paths: list[str], prefixes: tuple[str, ...] = ()) -> None:
    """Check size and sha256 of the bundle files an export reads (the device trusts only the manifest):
    `relative_paths`, and every listed file under one of `prefixes`."""
    wanted = set(relative_paths)
    listed = {rel: facts for rel, facts in BundleManifest.of(manifest).files.items() if rel in wanted or rel.startswith(prefixes)}
    problems = verify_files(bundle_dir, {"files": listed})
    unlisted = sorted(wanted - set(listed))
    problems += [f"{rel} is not in the manifest's file table" for rel in unlisted]
    if problems:
        raise BundleError(f"bundle {bundle_dir} is damaged: {'; '.join(problems[:5])}", hint="prepare the bundle again or copy it anew")
