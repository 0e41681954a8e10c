"""The files beside an exported ONNX model that other runtimes read, written into an export's staging folder.

- `config.json`: the source model's own configuration (kept by `ortft prepare` in the bundle), which
  Optimum's `ORTModelForCausalLM` and lm-eval's backends read;
- the tokenizer (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`) and
  `chat_template.jinja` at the folder's root, where `AutoTokenizer` and onnxruntime-genai look;
- `generation_config.json` (Hugging Face's) and `genai_config.json` (onnxruntime-genai's).

Device side: JSON and file copies only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .bundle import TOKENIZER_DIR, BundleManifest
from .export_genai import GENAI_CONFIG_FILE, genai_config
from .fsutil import write_json_atomic
from .trust import listed_files

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# Keys of a source config.json that describe how the checkpoint was stored, not the model.
CONFIG_KEYS_DROPPED = ("quantization_config", "_name_or_path", "_model_name_or_path")


def source_model_config(bundle_dir: Path, manifest: dict) -> dict | None:
    """The source model's config.json that prepare kept in the bundle, or None for a bundle made before."""
    relative = (BundleManifest.of(manifest).inference or {}).get("config")
    if not relative:
        return None
    return json.loads((Path(bundle_dir) / relative).read_text(encoding="utf-8"))


def export_model_config(config: dict) -> dict:
    """config.json for an exported float model: the source's, without storage details."""
    cleaned = {key: value for key, value in config.items() if key not in CONFIG_KEYS_DROPPED}
    cleaned["use_cache"] = True
    return cleaned


def generation_config(manifest: dict) -> dict:
    """generation_config.json as Hugging Face writes it: bos, eos (a list when several), pad."""
    model = BundleManifest.of(manifest).model
    eos_ids = list(model.get("eos_token_ids") or [])
    return {
        "bos_token_id": model.get("bos_token_id"),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        "pad_token_id": model.get("pad_token_id"),
        "max_length": model.get("max_seq_len"),
        "do_sample": False,
    }


def copy_tokenizer_to_root(bundle_dir: Path, out_dir: Path, manifest: dict) -> list[str]:
    """Copy the files of the bundle's tokenizer folder that its manifest lists (regular files, no links:
    ortft/trust.py) to the export's root; returns their names. Unlisted files are never copied."""
    names = []
    for relative, path in listed_files(bundle_dir, BundleManifest.of(manifest).files, f"{TOKENIZER_DIR}/"):
        shutil.copyfile(path, Path(out_dir) / Path(relative).name, follow_symlinks=False)
        names.append(Path(relative).name)
    return names


def export_tokenizer_section(manifest: dict, copied: list[str]) -> dict:
    """The export manifest's `tokenizer` section: the bundle's, with the files now at the root."""
    section = dict(BundleManifest.of(manifest).tokenizer)
    section["dir"] = "."
    section["chat_template"] = "chat_template.jinja" if "chat_template.jinja" in copied else None
    return section


def write_serving_files(out_dir: Path, bundle_dir: Path, manifest: dict, model_file: str = "model.onnx",
                        session_config: dict[str, str] | None = None) -> dict:
    """Write config.json, generation_config.json, genai_config.json and the tokenizer into `out_dir`.

    Returns {"tokenizer": section, "notes": [...]} for the export manifest; a bundle made before prepare
    kept its source's configuration gets no config.json, and a note that says so.
    """
    out_dir = Path(out_dir)
    notes = []
    config = source_model_config(bundle_dir, manifest)
    if config is not None:
        write_json_atomic(out_dir / CONFIG_FILE, export_model_config(config))
    else:
        notes.append(f"no {CONFIG_FILE}: bundle {bundle_dir} was prepared before ortft kept its source model's "
                     "configuration; Optimum and lm-eval need one: prepare the bundle again (`ortft prepare ... --force`)")
    copied = copy_tokenizer_to_root(bundle_dir, out_dir, manifest)
    write_json_atomic(out_dir / GENERATION_CONFIG_FILE, generation_config(manifest))
    write_json_atomic(out_dir / GENAI_CONFIG_FILE, genai_config(manifest, config, model_file, session_config))
    return {"tokenizer": export_tokenizer_section(manifest, copied), "notes": notes}
