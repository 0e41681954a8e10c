"""Test helper: a tiny causal-LM bundle (inference template, tokenizer, manifest) plus its PEFT twin and run folder.

Built from random configs in seconds, without the training artifacts `ortft prepare` also makes.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class TinyBundle:
    bundle_dir: Path
    manifest: dict
    base_model: object  # transformers model, no adapters
    peft_model: object  # the same base wrapped in PEFT, adapters with non-zero B
    adapter: dict  # graph name -> numpy array


def build_bundle(folder: Path, model_type: str = "llama", dora: bool = False, rank: int = 4, alpha: float = 8.0,
                 targets: str | list[str] = "all-linear", zero_b: bool = False, seed: int = 0, **config_overrides) -> TinyBundle:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ortft.config import PrepareConfig
    from ortft.manifest import write_manifest
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
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    if tokenizer.chat_template and not (folder / "tokenizer" / "chat_template.jinja").exists():
        (folder / "tokenizer" / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
    manifest = {
        "format": "ortft-bundle",
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
        "tokenizer": {"dir": "tokenizer", "chat_template": "tokenizer/chat_template.jinja"},
    }
    manifest = write_manifest(folder, manifest)
    adapter = {entry["name"]: dict(peft_model.named_parameters())[entry["name"]].detach().numpy().copy() for entry in trainable}
    return TinyBundle(folder, manifest, base_model, peft_model, adapter)


def make_run(run_dir: Path, bundle: TinyBundle, steps: tuple[int, ...] = (10,), best_step: int | None = None) -> Path:
    """RUN_DIR/run.json + checkpoints/step-NNNNNNNN (written by ortft.run, with hashes) (+ best.json).

    Export reads only the adapter.
    """
    from ortft import run as runs
    from ortft.manifest import manifest_digest

    run_dir.mkdir(parents=True, exist_ok=True)
    run_info = {"bundle": str(bundle.bundle_dir.resolve()), "bundle_manifest_sha256": manifest_digest(bundle.bundle_dir)}
    (run_dir / "run.json").write_text(json.dumps(run_info), encoding="utf-8")
    for step in steps:
        folder = runs.write_checkpoint(run_dir, step, bundle.adapter, {"step": step})
        if step == best_step:
            runs.write_best(run_dir, folder, step, 1.0)
    return run_dir


def onnx_logits(model_path: Path, input_ids: np.ndarray, session_config: dict[str, str] | None = None) -> np.ndarray:
    """Full-sequence logits of an exported KV-cache model, with an empty cache."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids),
             "position_ids": np.broadcast_to(np.arange(input_ids.shape[1]), input_ids.shape).astype(np.int64)}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            feeds[value.name] = np.zeros((input_ids.shape[0], value.shape[1], 0, value.shape[3]), np.float32)
    return session.run(["logits"], feeds)[0]


def torch_logits(model, input_ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(input_ids)).logits.numpy()
