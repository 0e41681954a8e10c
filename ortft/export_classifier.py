"""`ortft export` of a classification run (seq-cls, token-cls): merged-onnx with the classifier head in place.

The bundle's classifier template (ortft/prepare/classifier_inference.py: `input_ids`, `attention_mask`
-> `logits`) gets the adapters folded into its base weights (ortft/merge.py) and the trained head's
weight and bias; the export holds model.onnx (+ model.onnx.data), the source model's config.json (with
its label names), the tokenizer at the root and a manifest with the task and labels, which
`ortft predict` reads. `peft` and `adapter` exports of these runs are written as for a causal LM; the
formats that serve a causal LM (onnx-adapter, gguf, gguf-lora) are refused. Device side: numpy and onnx.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import TOKENIZER_DIR, BundleManifest
from .errors import BundleError, ConfigError
from .export_files import (
    copy_tokenizer_to_root,
    export_model_config,
    export_tokenizer_section,
    source_model_config,
)
from .export_manifest import write_export_manifest
from .fsutil import staged_dir, write_json_atomic
from .inference_template import InferenceTemplate
from .merge import adapted_modules, full_replacements, merge_weights

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
CONFIG_FILE = "config.json"


def export_classifier(kind: str, bundle_dir: Path, manifest: dict, adapter: dict[str, np.ndarray], out_dir: Path | str,
                      force: bool = False, source: dict | None = None, quantize: str | None = None) -> dict:
    """The export of `kind` for a classification bundle: merged-onnx here; other formats refused."""
    task = BundleManifest.of(manifest).task
    if kind != "merged-onnx":
        raise ConfigError(f"--format {kind} serves causal language models; this run's bundle is {task}",
                          hint="export it with --format merged-onnx (for `ortft predict`), peft or adapter")
    if quantize:
        raise ConfigError(f"--quantize applies to causal language models; this run's bundle is {task}",
                          hint="drop --quantize: a classifier's merged export stays float32")
    return export_merged_classifier(bundle_dir, manifest, adapter, out_dir, force, source)


def export_merged_classifier(bundle_dir: Path, manifest: dict, adapter: dict[str, np.ndarray], out_dir: Path | str,
                             force: bool = False, source: dict | None = None) -> dict:
    """EXPORT_DIR/{model.onnx, model.onnx.data, config.json, tokenizer files, manifest.json}; returns the manifest."""
    from .adapter import check_adapter
    from .export import verify_bundle_files

    bundle_dir = Path(bundle_dir)
    manifest = BundleManifest.of(manifest)
    check_adapter(manifest, adapter)
    if not manifest.inference:
        raise BundleError(f"bundle {bundle_dir} has no classifier template (prepared before ortft exported classifiers)",
                          hint="prepare the bundle again (`ortft prepare ... --force`); its runs' adapters still fit it")
    template = InferenceTemplate(bundle_dir, manifest)
    relative = [path.relative_to(bundle_dir).as_posix() for path in template.files()]
    verify_bundle_files(bundle_dir, manifest, [*relative, manifest.inference["config"]], prefixes=(f"{TOKENIZER_DIR}/",))
    names = {module.base_weight for module in adapted_modules(manifest, adapter).values()} | set(full_replacements(manifest, adapter))
    merged = merge_weights(manifest, template.read_weights(names), adapter)
    missing = sorted(set(full_replacements(manifest, adapter)) - set(merged))
    if missing:
        raise BundleError(f"the classifier template has no {', '.join(missing)} to put the trained head into",
                          hint="prepare the bundle again")
    with staged_dir(Path(out_dir), force) as staging:
        template.write_merged(staging, merged, MODEL_FILE, DATA_FILE)
        write_json_atomic(staging / CONFIG_FILE, export_model_config(source_model_config(bundle_dir, manifest)))
        copied = copy_tokenizer_to_root(bundle_dir, staging, manifest)
        extra = {
            "labels": manifest.labels,
            "inference": {key: manifest.inference[key] for key in ("inputs", "outputs")},
            "tokenizer": export_tokenizer_section(manifest, copied),
        }
        return write_export_manifest(staging, "merged-onnx", bundle_dir, manifest, source, extra=extra)
