"""Reference computations to compare ortft against: PyTorch + PEFT twins of a tiny bundle, their losses and
logits, random batches and adapters, and two TrainingSessions trained side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def batch_for(manifest: dict, batch: int = 2, seq: int = 12, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    vocab = manifest["model"]["vocab_size"]
    input_ids = rng.integers(3, vocab, size=(batch, seq), dtype=np.int64)
    attention_mask = np.ones((batch, seq), dtype=np.int64)
    attention_mask[-1, -3:] = 0  # right padding on the last row
    result = {"input_ids": input_ids, "attention_mask": attention_mask}
    if manifest["task"] == "causal-lm":
        result["position_ids"] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        labels = input_ids.copy()
        labels[:, :3] = -100
        labels[attention_mask == 0] = -100
        result["labels"] = labels
    elif manifest["task"] == "token-cls":
        labels = rng.integers(0, len(manifest["labels"]), size=(batch, seq), dtype=np.int64)
        labels[:, 0] = -100  # a CLS/BOS position
        labels[:, 2::3] = -100  # later sub-tokens of a word
        labels[attention_mask == 0] = -100
        result["labels"] = labels
    else:
        result["labels"] = rng.integers(0, len(manifest["labels"]), size=(batch,), dtype=np.int64)
    return result


def randomize_adapters(session, manifest: dict, seed: int = 2) -> dict[str, np.ndarray]:
    """Give every trainable tensor random values (B != 0), in the ORT checkpoint state; return them."""
    rng = np.random.default_rng(seed)
    values = {}
    for entry in manifest["trainable"]:
        current = session.parameter(entry["name"])
        if entry["role"] == "magnitude":
            value = current * rng.uniform(0.8, 1.2, size=current.shape).astype(np.float32)
        else:
            value = (rng.standard_normal(current.shape) * 0.05).astype(np.float32)
        session.set_parameter(entry["name"], value)
        values[entry["name"]] = value
    return values


def torch_peft_model(manifest: dict, model_dir: Path, adapter_values: dict[str, np.ndarray] | None, base_model=None):
    """The same model in PyTorch + PEFT, with the adapter tensors set to `adapter_values` (on `base_model`, a
    causal LM, when given, e.g. `template_base_model`'s)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    adapter = manifest["adapter"]
    torch.manual_seed(manifest["prepare"]["config"]["seed"])
    if base_model is not None:
        model = base_model
    elif manifest["task"] == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager")
    elif manifest["task"] == "token-cls":
        model = AutoModelForTokenClassification.from_pretrained(
            str(model_dir), num_labels=len(manifest["labels"]), attn_implementation="eager", ignore_mismatched_sizes=True
        )
    else:
        labels = manifest["labels"]
        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), num_labels=len(labels), attn_implementation="eager"
        )
    config = LoraConfig(
        r=adapter["rank"], lora_alpha=adapter["alpha"], target_modules=adapter["targets"],
        layers_to_transform=adapter["layers_to_transform"], use_dora=adapter["type"] == "dora",
        use_rslora=adapter["rslora"], modules_to_save=adapter["modules_to_save"] or None,
    )
    peft_model = get_peft_model(model, config)
    if adapter_values:
        params = dict(peft_model.named_parameters())
        with torch.no_grad():
            for name, value in adapter_values.items():
                params[name].copy_(torch.from_numpy(value))
    peft_model.eval()
    return peft_model


def template_base_model(manifest: dict, model_dir: Path, bundle_dir: Path):
    """The causal LM of `model_dir` in PyTorch, no adapters, holding the base weights the bundle's inference
    template holds (a QLoRA bundle's: dequantized, the base its adapters were trained against)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ortft.inference_template import InferenceTemplate

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager")
    template = InferenceTemplate(bundle_dir, manifest)
    with torch.no_grad():
        for hf_name in template.parameters():
            model.get_parameter(hf_name).copy_(torch.from_numpy(np.array(template.read_parameter(hf_name), dtype=np.float32)))
    return model.eval()


def causal_lm_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """The mean cross-entropy a causal LM's graph computes: position t predicts labels[t + 1]; -100 is ignored."""
    shifted_logits, shifted_labels = logits[:, :-1].astype(np.float64), labels[:, 1:]
    counted = shifted_labels != -100
    top = shifted_logits.max(-1, keepdims=True)
    log_norm = np.log(np.exp(shifted_logits - top).sum(-1)) + top[..., 0]
    chosen = np.take_along_axis(shifted_logits, np.where(counted, shifted_labels, 0)[..., None], -1)[..., 0]
    return float(((log_norm - chosen) * counted).sum() / counted.sum())


def torch_loss(peft_model, batch: dict) -> float:
    import torch

    with torch.no_grad():
        inputs = {name: torch.from_numpy(value) for name, value in batch.items()}
        return float(peft_model(**inputs).loss)


def assert_trains_alike(sessions: list, batch: dict, steps: int = 3, rel: float = 1e-6, rtol: float = 1e-5,
                        atol: float = 1e-7, lr: float = 5e-3) -> list[float]:
    """Train two TrainingSessions side by side on `batch`: the same loss every step and the same
    trainable weights after the last one (so the same gradients). Returns the last step's losses."""
    import pytest

    for _ in range(steps):
        losses = [float(np.asarray(session.train_step_forward_backward(batch))) for session in sessions]
        assert np.isfinite(losses[0]) and losses[1] == pytest.approx(losses[0], rel=rel)
        for session in sessions:
            session.optimizer_step(lr)
    for name in sessions[0].trainable_names():
        np.testing.assert_allclose(sessions[1].parameter(name), sessions[0].parameter(name), rtol=rtol, atol=atol)
    return losses


def onnx_logits(model_path: Path, input_ids: np.ndarray, session_config: dict[str, str] | None = None) -> np.ndarray:
    """Full-sequence logits of an exported KV-cache model, with an empty cache."""
    session = _session(model_path, session_config)
    return session.run(["logits"], _empty_cache_feeds(session, input_ids))[0]


def _session(model_path: Path, session_config: dict[str, str] | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def _empty_cache_feeds(session, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    feeds = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids),
             "position_ids": np.broadcast_to(np.arange(input_ids.shape[1]), input_ids.shape).astype(np.int64)}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            feeds[value.name] = np.zeros((input_ids.shape[0], value.shape[1], 0, value.shape[3]), np.float32)
    return feeds


def torch_logits(model, input_ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(input_ids)).logits.numpy()


def onnx_adapter_logits(folder, name, input_ids, session_config: dict[str, str] | None = None):
    """Logits with onnxruntime's own adapter API (RunOptions.add_active_adapter)."""
    import onnxruntime as ort

    session = _session(folder / "model.onnx", session_config)
    adapter = ort.LoraAdapter()
    adapter.Load(str(folder / "adapters" / f"{name}.onnx_adapter"))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    return session.run(["logits"], _empty_cache_feeds(session, input_ids), options)[0]
