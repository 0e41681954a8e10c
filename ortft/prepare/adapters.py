"""Inject LoRA/DoRA adapters with PEFT (or load a PEFT adapter) and describe what is trainable.

The description (one entry per trainable tensor, with its PEFT key) goes into the manifest.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..config import PrepareConfig
from ..errors import AdapterError, InputNotFoundError
from .architectures import Architecture
from .source_record import recorded_path

LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")
# ortft's classification tasks -> PEFT's task type; their classifier head is trained in full (modules_to_save).
CLASSIFICATION_TASK_TYPES = {"seq-cls": "SEQ_CLS", "token-cls": "TOKEN_CLS"}


def count_layers(model) -> int:
    config = model.config
    return int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))


def linear_module_names(model) -> list[str]:
    """Full names of the nn.Linear modules inside transformer layers."""
    import torch

    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and LAYER_INDEX.search(name + ".")
    ]


def resolve_targets(model, arch: Architecture, targets: str) -> list[str]:
    """Module-name suffixes to adapt: `all-linear` means every attention and MLP projection."""
    existing = linear_module_names(model)
    if targets.strip() in ("all-linear", "all", ""):
        wanted = list(arch.linear_modules)
    else:
        wanted = [part.strip() for part in targets.split(",") if part.strip()]
    missing = [t for t in wanted if not any(name == t or name.endswith("." + t) for name in existing)]
    if missing:
        suffixes = sorted({name.split(".")[-1] for name in existing})
        raise AdapterError(
            f"--targets {','.join(missing)} matches no linear layer of this model",
            hint=f"linear layers in this model: {', '.join(suffixes)} (or use all-linear)",
        )
    return wanted


def resolve_layers(model, layers: int | None) -> list[int] | None:
    """Indices of the last `layers` transformer layers, or None for all of them."""
    total = count_layers(model)
    if layers is None:
        return None
    if layers < 1 or layers > total:
        raise AdapterError(
            f"--layers {layers} is out of range: this model has {total} transformer layers",
            hint=f"give a number from 1 to {total}",
        )
    return list(range(total - layers, total))


def adapter_scale(alpha: float, rank: int, rslora: bool) -> float:
    """The factor in W + scale * B A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def check_settings(config: PrepareConfig) -> None:
    if config.rank < 1:
        raise AdapterError(f"--rank {config.rank} is invalid", hint="the LoRA rank must be at least 1 (16 is typical)")
    if not 0.0 <= config.dropout < 1.0:
        raise AdapterError(f"--dropout {config.dropout} is invalid", hint="give a probability in [0, 1)")
    if config.alpha <= 0:
        raise AdapterError(f"--alpha {config.alpha} is invalid", hint="alpha must be positive (commonly 2 x rank)")


def inject(model, config: PrepareConfig, arch: Architecture, task: str):
    """Wrap `model` in a PEFT model with fresh adapters, or with those of `config.adapter`."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if config.adapter:
        check_adapter_overrides(Path(config.adapter), config.adapter_overrides)
        return _load_existing(model, Path(config.adapter), PeftModel)
    check_settings(config)
    targets = resolve_targets(model, arch, config.targets)
    layer_indices = resolve_layers(model, config.layers)
    modules_to_save = list(arch.classifier_modules) if task in CLASSIFICATION_TASK_TYPES else None
    lora_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        layers_to_transform=layer_indices,
        use_dora=config.dora,
        use_rslora=config.rslora,
        modules_to_save=modules_to_save,
        task_type=CLASSIFICATION_TASK_TYPES.get(task, "CAUSAL_LM"),
        bias="none",
    )
    return get_peft_model(model, lora_config)


def check_adapter_overrides(adapter_dir: Path, overrides: dict) -> None:
    """Settings given beside --adapter must agree with the adapter's own adapter_config.json."""
    config_path = adapter_dir / "adapter_config.json"
    if not overrides or not config_path.is_file():
        return
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return  # _load_existing reports the damaged file
    saved_targets = saved.get("target_modules")
    actual = {
        "rank": saved.get("r"),
        "alpha": saved.get("lora_alpha"),
        "dora": bool(saved.get("use_dora", False)),
        "targets": sorted(saved_targets) if isinstance(saved_targets, list) else saved_targets,
    }
    for name, value in overrides.items():
        if name == "targets":
            if value.strip() in ("all-linear", "all", ""):
                continue
            value = sorted(part.strip() for part in value.split(",") if part.strip())
        if actual.get(name) is not None and value != actual[name] and not (name == "alpha" and float(value) == float(actual[name])):
            flag = "--" + name
            raise AdapterError(
                f"{flag} {value} contradicts the adapter in {adapter_dir} ({name} = {actual[name]} in adapter_config.json)",
                hint=f"drop {flag}: --adapter takes its settings from the adapter",
            )


def _load_existing(model, adapter_dir: Path, peft_model_class):
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise InputNotFoundError(f"{config_path} does not exist", hint="--adapter takes a PEFT adapter folder")
    try:
        settings = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(settings, dict) or settings.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_path}: peft_type {settings.get('peft_type') if isinstance(settings, dict) else None} is not LoRA",
                           hint="ortft trains LoRA and DoRA adapters")
    check_adapter_weights(adapter_dir)
    try:
        peft_model = peft_model_class.from_pretrained(model, str(adapter_dir), is_trainable=True)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise AdapterError(
            f"the adapter in {adapter_dir} does not fit this model: {str(exc).splitlines()[0][:400]}",
            hint="use an adapter trained on this same base model (same architecture, sizes and rank)",
        ) from exc
    return peft_model


def check_adapter_weights(adapter_dir: Path) -> None:
    """The adapter's weights must be adapter_model.safetensors, readable by ortft's own parser (header size capped,
    offsets checked, float32/float16/bfloat16, finite) before PEFT loads them; pickle (.bin) weights are refused."""
    from ..adapter_tensors import read_safetensors, float32_tensors

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        pickles = sorted(p.name for p in adapter_dir.glob("adapter_model*") if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        raise AdapterError(f"{adapter_dir} has no adapter_model.safetensors" + (f" (only pickle weights: {', '.join(pickles)})" if pickles else ""),
                           hint="pickle files can run code when loaded; convert the adapter to safetensors on a trusted machine")
    tensors, _metadata = read_safetensors(path, AdapterError)
    float32_tensors(tensors, str(path), AdapterError)


def adapter_settings(peft_model, config: PrepareConfig) -> dict:
    """The manifest's `adapter` section, read back from the PEFT config actually in force."""
    lora = peft_model.peft_config["default"]
    rank = int(lora.r)
    targets = sorted(lora.target_modules) if not isinstance(lora.target_modules, str) else [lora.target_modules]
    layers = lora.layers_to_transform
    if isinstance(layers, int):
        layers = [layers]
    return {
        "type": "dora" if lora.use_dora else "lora",
        "rank": rank,
        "alpha": float(lora.lora_alpha),
        "dropout": float(lora.lora_dropout),
        "rslora": bool(lora.use_rslora),
        "scale": adapter_scale(float(lora.lora_alpha), rank, bool(lora.use_rslora)),
        "targets": targets,
        "layers": list(layers) if layers is not None else list(range(count_layers(peft_model.get_base_model()))),
        "layers_to_transform": list(layers) if layers is not None else None,
        "modules_to_save": sorted(lora.modules_to_save or []),
        "init_from": recorded_path(config.adapter, config.record_source_path),  # a name unless --record-source-path
        "task_type": str(lora.task_type.value if hasattr(lora.task_type, "value") else lora.task_type),
    }


def _role(name: str) -> str:
    if ".lora_A." in name:
        return "lora_A"
    if ".lora_B." in name:
        return "lora_B"
    if ".lora_magnitude_vector." in name:
        return "magnitude"
    return "full"


def _hf_module(name: str) -> str:
    """`base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight` -> `model.layers.0.self_attn.q_proj`."""
    inner = name.removeprefix("base_model.model.")
    for marker in (".lora_A.", ".lora_B.", ".lora_magnitude_vector.", ".modules_to_save."):
        if marker in inner:
            return inner.split(marker)[0]
    return inner.rsplit(".", 1)[0]


def describe_trainable(peft_model) -> list[dict]:
    """One manifest entry per trainable tensor: graph name, PEFT key, shape, role, module, base weight."""
    import warnings

    from peft import get_peft_model_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Could not find a config file ...": irrelevant for key names
        peft_state = get_peft_model_state_dict(peft_model)
    key_by_pointer = {tensor.data_ptr(): key for key, tensor in peft_state.items()}
    entries = []
    for name, param in peft_model.named_parameters():
        if not param.requires_grad:
            continue
        peft_key = key_by_pointer.get(param.data_ptr())
        if peft_key is None:
            raise RuntimeError(f"trainable parameter {name} has no PEFT state-dict key")
        role = _role(name)
        module = _hf_module(name)
        entries.append(
            {
                "name": name,
                "peft_key": peft_key,
                "shape": list(param.shape),
                "role": role,
                "module": module,
                "base_weight": f"{module}.weight" if role != "full" else None,
            }
        )
    return entries
