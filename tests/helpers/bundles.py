"""The tests' tiny bundles, built from random configs (nothing downloaded), in two sizes.

- `prepare_tiny` / `tiny_bundle`: what `ortft prepare` makes (training and eval graphs, initial adapter,
  inference template), in-process; `tiny_bundle` prepares each one once per test session.
- `build_bundle`: only what exports read (inference template, tokenizer, manifest), in seconds, plus the
  same model in PyTorch + PEFT with non-zero adapters to compare exports against.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from ortft.bundle import MANIFEST_NAME, TOKENIZER_DIR, BundleManifest
from ortft.config import PrepareConfig


def prepare_tiny(model_dir: Path, out: Path, **settings) -> dict:
    """`ortft prepare` of `model_dir` into `out`, in-process (LoRA r=4, alpha 8 unless `settings` say otherwise)."""
    from ortft.prepare.pipeline import prepare_bundle

    config = PrepareConfig(model=str(model_dir), out=str(out), rank=settings.pop("rank", 4), alpha=settings.pop("alpha", 8), **settings)
    return prepare_bundle(config, quiet=True)


def tiny_bundle(tmp_path_factory, model_dir: Path, name: str, **settings) -> Path:
    """A bundle prepared from `model_dir` once per test session (shared by every test module)."""
    folder = tmp_path_factory.getbasetemp() / "train-bundles" / name
    if not (folder / MANIFEST_NAME).is_file():
        prepare_tiny(model_dir, folder, **settings)
    return folder


@dataclass
class TinyBundle:
    """A bundle of `build_bundle` and its PyTorch twins."""

    bundle_dir: Path
    manifest: BundleManifest
    base_model: object  # transformers model, no adapters
    peft_model: object  # the same base wrapped in PEFT, adapters with non-zero B
    adapter: dict  # graph name -> numpy array


def build_bundle(folder: Path, model_type: str = "llama", dora: bool = False, rank: int = 4, alpha: float = 8.0,
                 targets: str | list[str] = "all-linear", zero_b: bool = False, seed: int = 0, **config_overrides) -> TinyBundle:
    """FOLDER/{inference/, tokenizer/, manifest.json} of a tiny random `model_type` model with LoRA (or DoRA) on
    `targets`: the bundle an export reads, without the training graphs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ortft.manifest import BUNDLE_FORMAT, write_manifest
    from ortft.prepare import adapters
    from ortft.prepare.architectures import ARCHITECTURES
    from ortft.prepare.inference import export_inference_template
    from ortft.prepare.tiny import save_tiny_model

    model_dir = save_tiny_model(folder.parent / f"{folder.name}-hf-model", model_type, seed=seed, **config_overrides)
    base_model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    config = base_model.config
    folder.mkdir(parents=True, exist_ok=True)
    inference = export_inference_template(base_model, folder / "inference")
    target_list = list(ARCHITECTURES[model_type].linear_modules) if targets == "all-linear" else list(targets)
    lora_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_list, use_dora=dora, task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base_model), lora_config).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name and not zero_b:
                param.copy_(torch.randn_like(param) * 0.2)
            if ".lora_magnitude_vector." in name:
                param.mul_(1.0 + 0.1 * torch.rand_like(param))
    trainable = adapters.describe_trainable(peft_model)
    prepare_config = PrepareConfig(rank=rank, alpha=alpha, targets=",".join(target_list), dora=dora)
    adapter_section = adapters.adapter_settings(peft_model, prepare_config)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
    if tokenizer.chat_template and not (folder / TOKENIZER_DIR / "chat_template.jinja").exists():
        (folder / TOKENIZER_DIR / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": 1,
        "source": {"path": str(model_dir), "model_type": model_type},
        "task": "causal-lm",
        "model": {
            "num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
            "max_seq_len": 256, "bos_token_id": config.bos_token_id, "eos_token_ids": [config.eos_token_id],
            "pad_token_id": config.pad_token_id,
        },
        "adapter": adapter_section,
        "trainable": trainable,
        "inference": inference,
        "tokenizer": {"dir": TOKENIZER_DIR, "chat_template": f"{TOKENIZER_DIR}/chat_template.jinja"},
    }
    manifest = write_manifest(folder, manifest)
    parameters = dict(peft_model.named_parameters())
    adapter = {name: parameters[name].detach().numpy().copy() for name in manifest.trainable_names}
    return TinyBundle(folder, manifest, base_model, peft_model, adapter)
