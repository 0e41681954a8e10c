"""`ortft export --format gguf | gguf-lora`: llama.cpp's files, written with its own `gguf` package.

- gguf: OUT/model.gguf, the merged model (adapter folded in, ortft/merge.py) with llama.cpp's tensor names,
  row order and hyperparameters (ortft/gguf_layout.py), the tokenizer and chat template
  (ortft/gguf_vocab.py); weights f32, f16 or q8_0 (norms and biases stay f32, as llama.cpp's converter
  keeps them; a matrix whose rows are not a multiple of 32 long falls back to f16 under q8_0). Also
  OUT/Modelfile for `ollama create NAME -f OUT/Modelfile`.
- gguf-lora: OUT/adapter.gguf, a LoRA adapter for `llama-cli -m BASE.gguf --lora OUT/adapter.gguf`:
  `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha = scale * rank` (llama.cpp scales by
  alpha / rank), and per adapted weight `NAME.lora_a` [r, in] and `NAME.lora_b` [out, r] (rows in llama.cpp's
  order). The base is the source model in llama.cpp's layout: the GGUF the bundle was prepared from, or
  `ortft export` of a run whose adapter is zero. DoRA has no llama.cpp adapter form: export it merged.

Weights are written one at a time (the header first, from the shapes), so memory holds one base weight
besides the merged ones. Device side: numpy and the `gguf` package (`pip install 'ortft[gguf]'`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import BundleManifest
from .errors import BundleError
from .export_files import source_model_config
from .export_manifest import write_export_manifest
from .fsutil import staged_dir
from .gguf_layout import (
    TensorNames,
    gguf_architecture,
    gguf_module,
    gguf_rows,
    write_hyperparameters,
)
from .gguf_vocab import gguf_vocab
from .merge import adapted_modules, full_replacements, merge_weights

GGUF_TYPES = ("f32", "f16", "q8_0")
DEFAULT_GGUF_TYPE = "f16"
MODEL_FILE = "model.gguf"
LORA_FILE = "adapter.gguf"
MODELFILE = "Modelfile"
Q8_BLOCK = 32


def _config(bundle_dir: Path, manifest: dict) -> dict:
    config = source_model_config(bundle_dir, manifest)
    if config is None:
        raise BundleError(f"bundle {bundle_dir} keeps no config.json of its source model (prepared before ortft kept it); "
                          "GGUF export needs its rope and norm settings", hint="prepare the bundle again (`ortft prepare ... --force`)")
    return config


def _context_length(config: dict, manifest: dict) -> int:
    return int(config.get("max_position_embeddings") or BundleManifest.of(manifest).model.get("max_seq_len"))


def _model_name(manifest: dict) -> str:
    source = BundleManifest.of(manifest).source
    return Path(source.get("gguf_file") or source.get("path") or "model").stem + " (ortft fine-tune)"


# ---- merged ------------------------------------------------------------------------------------------


def _hf_shape(template, record: dict) -> list[int]:
    """A parameter's shape in Hugging Face's layout, from the graph (no weights read)."""
    value = record["value"]
    if value in template.initializers:
        dims = list(template.initializers[value].dims)
    else:
        dims = template.dequantized_dims(record)
    return dims[::-1] if record["layout"] == "in_out" else dims


def _ggml_type(gguf, values_shape: list[int], gguf_type: str):
    """The GGML type of one tensor: 1-D tensors stay f32; q8_0 needs rows a multiple of 32 long."""
    types = gguf.GGMLQuantizationType
    if len(values_shape) < 2 or gguf_type == "f32":
        return types.F32
    if gguf_type == "q8_0" and values_shape[-1] % Q8_BLOCK == 0:
        return types.Q8_0
    return types.F16


def _encode(gguf, values: np.ndarray, ggml_type) -> np.ndarray:
    types = gguf.GGMLQuantizationType
    if ggml_type == types.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if ggml_type == types.F16:
        return np.ascontiguousarray(values, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), ggml_type)


def _nbytes(gguf, shape: list[int], ggml_type) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    return int(np.prod(shape)) // block * type_size


def export_gguf(bundle_dir: Path | str, manifest: dict, adapter: dict[str, np.ndarray], out_dir: Path | str,
                gguf_type: str = DEFAULT_GGUF_TYPE, force: bool = False, source: dict | None = None) -> dict:
    """OUT/{model.gguf, Modelfile, manifest.json}: the merged model in llama.cpp's layout. Returns the export manifest."""
    from .adapter import check_adapter
    from .export import open_template

    if gguf_type not in GGUF_TYPES:
        raise BundleError(f"unknown GGUF type {gguf_type!r}", hint=f"use one of: {', '.join(GGUF_TYPES)}")
    gguf = gguf_module()
    bundle_dir = Path(bundle_dir)
    check_adapter(manifest, adapter)
    config = _config(bundle_dir, manifest)
    arch = gguf_architecture(config["model_type"])
    template = open_template(bundle_dir, manifest)
    names = TensorNames(arch, int(config["num_hidden_layers"]))
    base_names = {module.base_weight for module in adapted_modules(manifest, adapter).values()} | set(full_replacements(manifest, adapter))
    merged = merge_weights(manifest, template.read_weights(base_names), adapter)
    merged_by_initializer = template.by_initializer(merged)  # a tied head cannot be merged: refused as for ONNX
    vocab = gguf_vocab(bundle_dir, manifest, int(config["vocab_size"]))
    plan = []  # (gguf name, hf name, shape in HF's layout, ggml type)
    for hf_name, record in template.parameters().items():
        gguf_name = names.gguf_name(hf_name)
        if gguf_name is None:
            if hf_name.endswith((".weight", ".bias")):
                raise BundleError(f"llama.cpp's {arch} layout has no tensor for {hf_name}", hint="use --format merged-onnx or peft")
            continue
        plan.append((gguf_name, hf_name, record, _ggml_type(gguf, _hf_shape(template, record), gguf_type)))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    with staged_dir(Path(out_dir), force) as staging:
        path = staging / MODEL_FILE
        writer = gguf.GGUFWriter(str(path), arch)
        writer.add_name(_model_name(manifest))
        writer.add_file_type(int(file_type))
        if gguf_type == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hyperparameters(writer, arch, config, _context_length(config, manifest))
        vocab.write(writer)
        for gguf_name, _hf_name, record, ggml_type in plan:
            shape = _hf_shape(template, record)
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), _nbytes(gguf, shape, ggml_type), raw_dtype=ggml_type)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _gguf_name, hf_name, record, ggml_type in plan:
            values = merged_by_initializer.get(record["value"])
            values = np.asarray(values if values is not None else template.read_value(record["value"]), dtype=np.float32)
            if record["layout"] == "in_out":
                values = values.T
            writer.write_tensor_data(_encode(gguf, gguf_rows(hf_name, values, config["model_type"], config), ggml_type))
            del values
        writer.close()
        (staging / MODELFILE).write_text(f"FROM ./{MODEL_FILE}\n", encoding="utf-8")
        extra = {"gguf": {"file": MODEL_FILE, "architecture": arch, "type": gguf_type, "tensors": len(plan),
                          "tokenizer_pre": vocab.pre, "context_length": _context_length(config, manifest)}}
        return write_export_manifest(staging, "gguf", bundle_dir, manifest, source, extra=extra)


# ---- LoRA --------------------------------------------------------------------------------------------


def export_gguf_lora(bundle_dir: Path | str, manifest: dict, adapter: dict[str, np.ndarray], out_dir: Path | str,
                     force: bool = False, source: dict | None = None) -> dict:
    """OUT/{adapter.gguf, manifest.json}: the adapter as llama.cpp's LoRA. Returns the export manifest."""
    from .adapter import check_adapter

    gguf = gguf_module()
    bundle_dir = Path(bundle_dir)
    manifest = BundleManifest.of(manifest)
    check_adapter(manifest, adapter)
    settings = manifest.adapter
    if settings.get("type") == "dora" or any(entry["role"] == "magnitude" for entry in manifest.trainable):
        raise BundleError("llama.cpp's LoRA adapters cannot carry DoRA's magnitudes", hint="export --format gguf (merged) instead")
    if any(entry["role"] == "full" for entry in manifest.trainable):
        raise BundleError("the bundle trains whole modules, which a llama.cpp LoRA adapter cannot carry", hint="export --format gguf (merged) instead")
    config = _config(bundle_dir, manifest)
    arch = gguf_architecture(config["model_type"])
    names = TensorNames(arch, int(config["num_hidden_layers"]))
    tied = bool(config.get("tie_word_embeddings"))
    scale = float(settings["scale"])
    rank = int(settings["rank"])
    with staged_dir(Path(out_dir), force) as staging:
        path = staging / LORA_FILE
        writer = gguf.GGUFWriter(str(path), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, scale * rank)  # llama.cpp multiplies by alpha / rank
        writer.add_name(_model_name(manifest) + " LoRA")
        count = 0
        for hf_name, module in adapted_modules(manifest, adapter).items():
            gguf_name = names.gguf_name(hf_name)
            if gguf_name is None or (tied and gguf_name.startswith("output.")):
                raise BundleError(f"{hf_name} has no tensor of its own in llama.cpp's {arch} layout (a tied LM head?)",
                                  hint="export --format gguf (merged) instead")
            writer.add_tensor(f"{gguf_name}.lora_a", np.ascontiguousarray(module.lora_A, dtype=np.float32))
            writer.add_tensor(f"{gguf_name}.lora_b", gguf_rows(hf_name, np.ascontiguousarray(module.lora_B, dtype=np.float32),
                                                               config["model_type"], config))
            count += 1
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        base = manifest.source.get("gguf_file")  # the source GGUF's file name (no host paths in exports)
        extra = {"gguf": {"file": LORA_FILE, "architecture": arch, "adapter_type": "lora", "alpha": scale * rank, "rank": rank,
                          "adapted_weights": count, "base_model": base}}
        return write_export_manifest(staging, "gguf-lora", bundle_dir, manifest, source, extra=extra)
