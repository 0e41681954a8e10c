"""Find and load the source model: a Hugging Face folder or a GGUF file, never from a hub.

Refuses folders that need `trust_remote_code` and pickle weights; the loaded model is plain float32.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputNotFoundError, ModelError
from ..fsutil import sha256_file

log = logging.getLogger(__name__)

SAFE_WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class ModelSource:
    """Where the model comes from, resolved and checked before anything heavy is loaded."""

    folder: Path
    gguf_file: str | None
    weight_files: list[Path] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def display(self) -> str:
        return str(self.folder / self.gguf_file) if self.gguf_file else str(self.folder)

    def weights_sha256(self) -> dict[str, str]:
        return {path.name: sha256_file(path) for path in self.weight_files}


def resolve_source(model: str, gguf_file: str | None) -> ModelSource:
    """Check that MODEL is a usable local folder or .gguf file; say precisely what is wrong if not."""
    path = Path(model).expanduser()
    if not path.exists():
        looks_like_hub_id = "/" in model and not model.startswith((".", "/", "~")) and model.count("/") == 1
        hint = (
            "ortft never downloads models: download it on a machine with network access "
            "(e.g. `huggingface-cli download NAME --local-dir DIR`) and pass the local folder"
            if looks_like_hub_id
            else "pass a local Hugging Face model folder (config.json + *.safetensors) or a .gguf file"
        )
        raise InputNotFoundError(f"model path {model} does not exist", hint=hint)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(
                f"{path} is a file but not a .gguf checkpoint",
                hint="pass a Hugging Face model folder, or a .gguf file",
            )
        if gguf_file and gguf_file != path.name:
            raise ModelError(f"--gguf-file {gguf_file} contradicts MODEL {path}", hint="give one of them")
        return _gguf_source(path.parent, path.name)
    if gguf_file:
        if not (path / gguf_file).is_file():
            present = sorted(p.name for p in path.glob("*.gguf"))
            raise InputNotFoundError(
                f"{path / gguf_file} does not exist",
                hint=f"GGUF files in {path}: {', '.join(present) or 'none'}",
            )
        return _gguf_source(path, gguf_file)
    return _folder_source(path)


def _gguf_source(folder: Path, name: str) -> ModelSource:
    from .gguf_checks import check_gguf

    check_gguf(folder / name)  # declared sizes against the tensors, and memory, before transformers allocates anything
    return ModelSource(folder=folder, gguf_file=name, weight_files=[folder / name])


def _folder_source(folder: Path) -> ModelSource:
    config_path = folder / "config.json"
    if not config_path.is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_source(folder, ggufs[0])
        hint = (
            f"this folder holds GGUF files ({', '.join(ggufs)}): pick one with --gguf-file"
            if ggufs
            else "a Hugging Face model folder has config.json beside its *.safetensors weights"
        )
        raise ModelError(f"{folder} has no config.json", hint=hint)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{config_path} is not valid JSON: {exc}", hint="repair or re-download config.json") from exc
    if not isinstance(config, dict):
        raise ModelError(f"{config_path} does not hold a JSON object", hint="repair or re-download config.json")
    if config.get("auto_map"):
        raise ModelError(
            f"{config_path} asks for custom code (auto_map: trust_remote_code)",
            hint="ortft never runs code from a model folder; use a model whose architecture transformers ships",
        )
    safe = sorted(p for p in folder.iterdir() if p.suffix in SAFE_WEIGHT_SUFFIXES)
    if not safe:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_WEIGHT_SUFFIXES)
        if pickles:
            raise ModelError(
                f"{folder} holds only pickle weights ({', '.join(pickles)})",
                hint="pickle files can run code when loaded; convert them to safetensors on a trusted machine",
            )
        raise ModelError(f"{folder} has config.json but no *.safetensors weights", hint="copy the weight files too")
    return ModelSource(folder=folder, gguf_file=None, weight_files=safe, config=config)


def load_config(source: ModelSource):
    """The transformers config of the source (GGUF metadata is read by transformers)."""
    from transformers import AutoConfig

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(str(source.folder), trust_remote_code=False, local_files_only=True, **kwargs)
    except ValueError as exc:
        raise ModelError(f"{source.display}: transformers cannot read this model's config: {exc}") from exc
    if getattr(config, "quantization_config", None) is not None:
        # GGUF checkpoints are de-quantized on load; the config must describe a plain float model.
        del config.quantization_config
    return config


def load_model(source: ModelSource, config, task: str, num_labels: int | None, seed: int, quiet: bool = False):
    """Load the model in float32 for `task`, with eager attention (what the exporter handles).

    `quiet` also hides transformers' own progress bar of a GGUF load.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    torch.manual_seed(seed)  # a new classifier head is initialised reproducibly
    auto = {"seq-cls": AutoModelForSequenceClassification, "token-cls": AutoModelForTokenClassification}.get(task, AutoModelForCausalLM)
    if task != "causal-lm":
        config.num_labels = num_labels
    if task == "seq-cls":
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = getattr(config, "eos_token_id", 0) if not isinstance(
                getattr(config, "eos_token_id", None), list) else config.eos_token_id[0]
    config._attn_implementation = "eager"
    kwargs = dict(config=config, trust_remote_code=False, local_files_only=True, dtype=torch.float32)
    if task == "token-cls":
        kwargs["ignore_mismatched_sizes"] = True  # a classifier head of another label count starts anew (it is trained in full)
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    else:
        kwargs["use_safetensors"] = True
    try:
        with _gguf_progress_hidden(quiet and bool(source.gguf_file)):
            model = auto.from_pretrained(str(source.folder), attn_implementation="eager", **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{source.display}: could not load the weights: {exc}") from exc
    model = model.float()
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model


@contextlib.contextmanager
def _gguf_progress_hidden(hidden: bool):
    """Disable the tqdm bar transformers draws while it de-quantizes GGUF tensors.

    It is a plain `tqdm.auto` bar bound at import time in transformers' GGUF module (transformers'
    `disable_progress_bar()` does not reach it), so the module's name is swapped for the block only.
    """
    if not hidden:
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:  # a transformers without that bar: nothing to hide
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load_tokenizer(source: ModelSource):
    """The fast tokenizer of the source, saved later into the bundle for the device.

    A Hugging Face folder's tokenizer files are used as they are; a GGUF's tokenizer takes its special
    tokens, BOS/EOS behaviour and decoder from the GGUF's own fields (see `gguf_tokenizer`).
    """
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.folder), trust_remote_code=False, local_files_only=True, use_fast=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{source.display}: no usable tokenizer: {exc}", hint="copy tokenizer.json and tokenizer_config.json into the model folder") from exc
    if source.gguf_file:
        from .gguf_tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(source.folder / source.gguf_file, tokenizer)
    return tokenizer
