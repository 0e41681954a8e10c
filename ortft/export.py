"""Turn a trained adapter into something to ship: a merged ONNX model, a PEFT adapter folder, or raw adapter weights.

Device side: numpy, onnx, safetensors only. Every output folder is staged and renamed into place.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__
from . import run as runs
from .run import load_adapter  # noqa: F401  (part of this module's API: export reads adapters)
from .errors import BundleError, ConfigError, RunError
from .fsutil import check_output_dir, sha256_file, staged_dir, write_bytes_atomic, write_json_atomic
from .manifest import MANIFEST_NAME, bundle_digests, manifest_digest, read_manifest, verify_files

EXPORT_FORMAT = "ortft-export"
EXPORT_FORMAT_VERSION = 1
EXPORT_KINDS = ("merged-onnx", "peft", "adapter")
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TOKENIZER_DIR = "tokenizer"
ADAPTER_FILE = "adapter.safetensors"
NUMPY_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64}


# ---- run folders ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunCheckpoint:
    """Where a run's bundle and the chosen checkpoint's adapter weights live."""

    run_dir: Path
    bundle_dir: Path
    checkpoint_dir: Path | None
    adapter_path: Path


def resolve_run_checkpoint(run_dir: Path | str, checkpoint: str = "latest") -> RunCheckpoint:
    """Read RUN_DIR/run.json and pick a checkpoint: `latest`, `best` or a path (folder or .safetensors).

    The bundle named in run.json must still have the manifest the run was trained on.
    """
    run_dir = Path(run_dir)
    run_info = _read_run_json(run_dir)
    bundle_dir = Path(run_info.get("bundle", ""))
    if not (bundle_dir / MANIFEST_NAME).is_file():
        raise RunError(
            f"{run_dir / 'run.json'} names bundle {bundle_dir}, which has no {MANIFEST_NAME}",
            hint="move the bundle back to that path, or edit run.json to point at it",
        )
    expected_digest = run_info.get("bundle_manifest_sha256")
    if expected_digest and expected_digest not in bundle_digests(bundle_dir):
        raise RunError(
            f"the bundle at {bundle_dir} is not the one run {run_dir} was trained on (manifest sha256 differs)",
            hint="point run.json at the original bundle",
        )
    checkpoint_dir, adapter_path = _choose_checkpoint(run_dir, checkpoint)
    return RunCheckpoint(run_dir, bundle_dir, checkpoint_dir, adapter_path)


def _read_run_json(run_dir: Path) -> dict:
    info = runs.read_run(run_dir)
    if not isinstance(info, dict) or not info.get("bundle"):
        raise RunError(f"{run_dir / runs.RUN_FILE} does not name its bundle", hint="the run folder is damaged")
    return info


def _choose_checkpoint(run_dir: Path, checkpoint: str) -> tuple[Path | None, Path]:
    """A checkpoint folder (verified against its recorded hashes) and its adapter; or a bare adapter file."""
    if checkpoint not in ("latest", "best"):
        path = Path(checkpoint)
        candidate = path if path.is_absolute() or path.exists() else run_dir / path
        if candidate.is_file():
            return None, candidate
    folder = runs.resolve_checkpoint(run_dir, checkpoint)
    return folder, folder / runs.ADAPTER_FILE


# ---- adapters ------------------------------------------------------------------------------------


def check_adapter(manifest: dict, adapter: dict[str, np.ndarray], where: str = "the adapter") -> None:
    """Every trainable tensor of the manifest must be in `adapter` with its shape."""
    problems = []
    for entry in manifest["trainable"]:
        tensor = adapter.get(entry["name"])
        if tensor is None:
            problems.append(f"{entry['name']} missing")
        elif list(tensor.shape) != list(entry["shape"]):
            problems.append(f"{entry['name']} has shape {list(tensor.shape)}, expected {entry['shape']}")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise RunError(f"{where} does not fit the bundle: {shown}", hint="export a checkpoint of a run trained on this bundle")


# ---- merging -------------------------------------------------------------------------------------


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
    for entry in manifest["trainable"]:
        if entry["role"] == "full":
            continue
        module = modules.setdefault(entry["base_weight"], AdaptedModule(entry["base_weight"]))
        setattr(module, {"lora_A": "lora_A", "lora_B": "lora_B", "magnitude": "magnitude"}[entry["role"]], adapter[entry["name"]])
    return modules


def full_replacements(manifest: dict, adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF parameter name -> trained tensor, for fully trained modules (`modules_to_save`)."""
    replacements = {}
    for entry in manifest["trainable"]:
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
    scale = float(manifest["adapter"]["scale"])
    layouts = manifest["inference"]["weights"]
    merged = {}
    for hf_name, module in adapted_modules(manifest, adapter).items():
        if hf_name not in template_weights:
            raise BundleError(f"the inference template has no weight {hf_name} to merge into", hint="prepare the bundle again")
        layout = layouts[hf_name]["layout"]
        stored = template_weights[hf_name]
        base = stored if layout == "out_in" else stored.T
        merged_out_in = _merge_one(base, module, scale)
        merged[hf_name] = merged_out_in if layout == "out_in" else np.ascontiguousarray(merged_out_in.T)
    for hf_name, tensor in full_replacements(manifest, adapter).items():
        if hf_name in layouts:
            merged[hf_name] = tensor if layouts[hf_name]["layout"] == "out_in" else np.ascontiguousarray(tensor.T)
    return merged


def _merge_one(base: np.ndarray, module: AdaptedModule, scale: float) -> np.ndarray:
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


# ---- the inference template -----------------------------------------------------------------------


class InferenceTemplate:
    """The bundle's inference/model.onnx read without loading its weights; weights come from their byte ranges."""

    def __init__(self, bundle_dir: Path, manifest: dict):
        import onnx

        section = manifest.get("inference")
        if not section:
            raise BundleError(f"bundle {bundle_dir} has no inference template", hint="prepare it again with the inference template on (causal-lm only)")
        self.bundle_dir = Path(bundle_dir)
        self.section = section
        self.model_path = self.bundle_dir / section["model"]
        if not self.model_path.is_file():
            raise BundleError(f"{self.model_path} is missing", hint="prepare the bundle again or copy it anew")
        self.proto = onnx.load(str(self.model_path), load_external_data=False)
        self.initializers = {tensor.name: tensor for tensor in self.proto.graph.initializer}

    @property
    def data_path(self) -> Path | None:
        locations = {self._external(tensor).get("location") for tensor in self.initializers.values() if self._is_external(tensor)}
        if len(locations) > 1:
            raise BundleError(f"{self.model_path} keeps its weights in {len(locations)} files", hint="prepare the bundle again")
        return self.model_path.parent / locations.pop() if locations else None

    @staticmethod
    def _is_external(tensor) -> bool:
        import onnx

        return tensor.data_location == onnx.TensorProto.EXTERNAL

    @staticmethod
    def _external(tensor) -> dict:
        return {entry.key: entry.value for entry in tensor.external_data}

    def initializer_of(self, hf_name: str):
        return self.initializers[self.section["weights"][hf_name]["initializer"]]

    def read(self, hf_name: str) -> np.ndarray:
        """The base weight of `hf_name` as stored in its initializer."""
        from onnx import numpy_helper

        tensor = self.initializer_of(hf_name)
        if not self._is_external(tensor):
            return numpy_helper.to_array(tensor)
        dtype = self._numpy_dtype(tensor)
        facts = self._external(tensor)
        count = int(np.prod(list(tensor.dims))) if tensor.dims else 1
        values = np.fromfile(self.model_path.parent / facts["location"], dtype=dtype, count=count, offset=int(facts.get("offset", 0)))
        return values.reshape(list(tensor.dims))

    def _numpy_dtype(self, tensor):
        dtype = NUMPY_DTYPES.get(tensor.data_type)
        if dtype is None:
            raise BundleError(f"initializer {tensor.name} has ONNX data type {tensor.data_type}, which export cannot merge into", hint="prepare the bundle in float32 or float16")
        return dtype

    def read_weights(self, hf_names) -> dict[str, np.ndarray]:
        return {name: self.read(name) for name in hf_names if name in self.section["weights"]}

    def write_merged(self, out_dir: Path, merged: dict[str, np.ndarray]) -> None:
        """Write model.onnx (+ model.onnx.data) into `out_dir`: the template with `merged` weights patched in."""
        by_initializer = self._merged_by_initializer(merged)
        data_path = self.data_path
        if data_path is not None:
            shutil.copyfile(data_path, out_dir / data_path.name)
        inline_changed = False
        with open(out_dir / data_path.name, "r+b") if data_path is not None else contextlib.nullcontext() as data_file:
            for initializer_name, values in by_initializer.items():
                tensor = self.initializers[initializer_name]
                values = np.ascontiguousarray(values, dtype=self._numpy_dtype(tensor))
                if list(values.shape) != list(tensor.dims):
                    raise BundleError(f"merged {initializer_name} has shape {list(values.shape)}, template has {list(tensor.dims)}")
                if self._is_external(tensor):
                    data_file.seek(int(self._external(tensor).get("offset", 0)))
                    data_file.write(values.tobytes())
                else:
                    tensor.raw_data = values.tobytes()
                    del tensor.float_data[:]
                    inline_changed = True
        if inline_changed:
            (out_dir / MODEL_FILE).write_bytes(self.proto.SerializeToString())
        else:
            shutil.copyfile(self.model_path, out_dir / MODEL_FILE)

    def write_quantized(self, out_dir: Path, merged: dict[str, np.ndarray], scheme: str, block_size: int | None) -> dict:
        """Like `write_merged`, with the linear weights re-quantized (ortft/export_quantize.py).

        Returns the export manifest's `quantization` section.
        """
        from .export_quantize import QuantizedExportWriter

        self._merged_by_initializer(merged)  # a tied head cannot be merged: same refusal as without --quantize
        writer = QuantizedExportWriter(self, scheme, block_size)
        data_name = self.data_path.name if self.data_path is not None else DATA_FILE
        section = writer.write(out_dir, merged, MODEL_FILE, data_name)
        section["model_bytes_before"] = sum(path.stat().st_size for path in (self.model_path, self.data_path) if path is not None)
        section["model_bytes_after"] = sum((out_dir / name).stat().st_size for name in (MODEL_FILE, data_name))
        return section

    def _merged_by_initializer(self, merged: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Merged weights keyed by initializer; two HF names sharing one (a tied head) must agree."""
        consumers = self._consumer_counts()
        by_initializer: dict[str, np.ndarray] = {}
        for hf_name, values in merged.items():
            initializer_name = self.section["weights"][hf_name]["initializer"]
            sharing = [name for name, facts in self.section["weights"].items() if facts["initializer"] == initializer_name and name != hf_name]
            if sharing or consumers.get(initializer_name, 0) > 1:
                raise BundleError(
                    f"{hf_name} shares its weights ({initializer_name}) with another layer (tied embeddings?); "
                    "a merged export cannot change one without the other",
                    hint="export with --format peft or --format adapter instead",
                )
            by_initializer[initializer_name] = values
        return by_initializer

    def _consumer_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.proto.graph.node:
            for name in set(node.input):
                if name in self.initializers:
                    counts[name] = counts.get(name, 0) + 1
        return counts


# ---- the exports ---------------------------------------------------------------------------------


def export_merged_onnx(bundle_dir: Path | str, manifest: dict, adapter: dict[str, np.ndarray], out_dir: Path | str, force: bool = False,
                       source: dict | None = None, quantize: str | None = None, block_size: int | None = None) -> dict:
    """EXPORT_DIR/{model.onnx, model.onnx.data, tokenizer/, generation_config.json, manifest.json}.

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
    _verify_bundle_files(bundle_dir, manifest, prefixes=("inference/", f"{TOKENIZER_DIR}/"))
    template = InferenceTemplate(bundle_dir, manifest)
    base_names = {module.base_weight for module in adapted_modules(manifest, adapter).values()}
    base_names |= set(full_replacements(manifest, adapter))
    merged = merge_weights(manifest, template.read_weights(base_names), adapter)
    with staged_dir(Path(out_dir), force) as staging:
        extra = {"inference": _inference_facts(manifest)}
        if quantize:
            extra["quantization"] = template.write_quantized(staging, merged, quantize, block_size)
        else:
            template.write_merged(staging, merged)
        _copy_tokenizer(bundle_dir, staging)
        write_json_atomic(staging / "generation_config.json", generation_config(manifest))
        return _write_export_manifest(staging, "merged-onnx", bundle_dir, manifest, source, extra=extra)


def export_peft(manifest: dict, adapter: dict[str, np.ndarray], out_dir: Path | str, force: bool = False, source: dict | None = None) -> dict:
    """EXPORT_DIR/{adapter_config.json, adapter_model.safetensors}: loads with `PeftModel.from_pretrained`."""
    from safetensors.numpy import save

    check_adapter(manifest, adapter)
    peft_tensors = {entry["peft_key"]: np.ascontiguousarray(adapter[entry["name"]]) for entry in manifest["trainable"]}
    with staged_dir(Path(out_dir), force) as staging:
        write_json_atomic(staging / "adapter_config.json", peft_adapter_config(manifest))
        write_bytes_atomic(staging / "adapter_model.safetensors", save(peft_tensors, metadata={"format": "pt"}))
        return _write_export_manifest(staging, "peft", None, manifest, source)


def export_adapter(manifest: dict, adapter: dict[str, np.ndarray], out_dir: Path | str, force: bool = False, source: dict | None = None) -> dict:
    """EXPORT_DIR/{adapter.safetensors (graph names), manifest.json (adapter settings and tensor table)}."""
    from safetensors.numpy import save

    check_adapter(manifest, adapter)
    tensors = {entry["name"]: np.ascontiguousarray(adapter[entry["name"]]) for entry in manifest["trainable"]}
    with staged_dir(Path(out_dir), force) as staging:
        write_bytes_atomic(staging / ADAPTER_FILE, save(tensors))
        extra = {"adapter": manifest.get("adapter"), "trainable": manifest["trainable"]}
        return _write_export_manifest(staging, "adapter", None, manifest, source, extra=extra)


def export_run(run_dir: Path | str, out_dir: Path | str, checkpoint: str = "latest", kind: str = "merged-onnx", force: bool = False,
               quantize: str | None = None, block_size: int | None = None) -> dict:
    """`ortft export`: pick the run's checkpoint, check it against the bundle, write one export kind.

    `quantize` / `block_size` re-quantize a merged-onnx export's linear weights (int8 | int4).
    """
    from .export_quantize import check_quantize_options

    if kind not in EXPORT_KINDS:
        raise RunError(f"unknown export format {kind!r}", hint=f"use one of: {', '.join(EXPORT_KINDS)}")
    if (quantize or block_size is not None) and kind != "merged-onnx":
        raise ConfigError(f"--quantize and --block-size apply to --format merged-onnx only, not {kind}",
                          hint="drop --quantize (the adapter stays float32), or export --format merged-onnx")
    check_quantize_options(quantize, block_size)
    check_output_dir(Path(out_dir), force)
    chosen = resolve_run_checkpoint(run_dir, checkpoint)
    manifest = read_manifest(chosen.bundle_dir)
    adapter = load_adapter(chosen.adapter_path)
    check_adapter(manifest, adapter, where=str(chosen.adapter_path))
    source = {
        "run": str(Path(run_dir).resolve()),
        "checkpoint": str(chosen.checkpoint_dir or chosen.adapter_path),
        "bundle": str(chosen.bundle_dir.resolve()),
        "bundle_manifest_sha256": manifest_digest(chosen.bundle_dir),
    }
    if kind == "merged-onnx":
        return export_merged_onnx(chosen.bundle_dir, manifest, adapter, out_dir, force, source, quantize=quantize, block_size=block_size)
    if kind == "peft":
        return export_peft(manifest, adapter, out_dir, force, source)
    return export_adapter(manifest, adapter, out_dir, force, source)


# ---- the pieces of an export ---------------------------------------------------------------------


def generation_config(manifest: dict) -> dict:
    """generation_config.json as Hugging Face writes it: bos, eos (a list when several), pad."""
    model = manifest.get("model", {})
    eos_ids = list(model.get("eos_token_ids") or [])
    return {
        "bos_token_id": model.get("bos_token_id"),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        "pad_token_id": model.get("pad_token_id"),
        "max_length": model.get("max_seq_len"),
        "do_sample": False,
    }


def peft_adapter_config(manifest: dict) -> dict:
    """adapter_config.json with the keys of PEFT's LoraConfig that describe this adapter."""
    settings = manifest["adapter"]
    alpha = float(settings["alpha"])
    modules_to_save = list(settings.get("modules_to_save") or []) or None
    return {
        "peft_type": "LORA",
        "task_type": settings.get("task_type") or ("CAUSAL_LM" if manifest.get("task") == "causal-lm" else "SEQ_CLS"),
        "base_model_name_or_path": manifest.get("source", {}).get("path"),
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
    settings = manifest["adapter"]
    if "layers_to_transform" in settings:
        return settings["layers_to_transform"]
    layers = settings.get("layers")
    total = manifest.get("model", {}).get("num_layers")
    if layers is None or (total is not None and list(layers) == list(range(total))):
        return None
    return list(layers)


def _inference_facts(manifest: dict) -> dict:
    section = manifest["inference"]
    return {key: section[key] for key in ("inputs", "outputs", "num_layers", "num_key_value_heads", "head_dim") if key in section}


def _copy_tokenizer(bundle_dir: Path, out_dir: Path) -> None:
    source = bundle_dir / TOKENIZER_DIR
    if source.is_dir():
        shutil.copytree(source, out_dir / TOKENIZER_DIR)


def _verify_bundle_files(bundle_dir: Path, manifest: dict, prefixes: tuple[str, ...]) -> None:
    """Check size and sha256 of the bundle files an export copies (the device trusts only the manifest)."""
    listed = {rel: facts for rel, facts in manifest.get("files", {}).items() if rel.startswith(prefixes)}
    problems = verify_files(bundle_dir, {"files": listed})
    if problems:
        raise BundleError(f"bundle {bundle_dir} is damaged: {'; '.join(problems[:5])}", hint="prepare the bundle again or copy it anew")


def _write_export_manifest(staging: Path, kind: str, bundle_dir: Path | None, manifest: dict, source: dict | None, extra: dict | None = None) -> dict:
    source = dict(source or {})
    if bundle_dir is not None and "bundle_manifest_sha256" not in source:
        source.update(bundle=str(Path(bundle_dir).resolve()), bundle_manifest_sha256=manifest_digest(bundle_dir))
    export_manifest = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "kind": kind,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "ortft": __version__,
        "source": source,
        "task": manifest.get("task"),
        "model": manifest.get("model"),
        "tokenizer": manifest.get("tokenizer"),
        **(extra or {}),
        "files": _file_table(staging),
    }
    write_json_atomic(staging / MANIFEST_NAME, export_manifest)
    return export_manifest


def _file_table(root: Path) -> dict[str, dict]:
    table = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and relative != MANIFEST_NAME:
            table[relative] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return table
