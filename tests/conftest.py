"""Shared fixtures: tiny random models saved as Hugging Face folders (built from configs, never downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_VOCAB = 320


def _tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    """A byte-level BPE tokenizer trained in memory on a few sentences, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = ["The capital of France is Paris.", "Answer: 42. (six times seven)", "hello world"] * 20
    tokenizer.train_from_iterator(corpus, trainer)
    bos = tokenizer.token_to_id("<|im_start|>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    return fast


def tiny_config(model_type: str, vocab_size: int = TINY_VOCAB, **overrides):
    """A random-weights config of `model_type`, small enough to export in seconds."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if model_type == "bert":
        common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=256, pad_token_id=0)
    if model_type == "gemma":
        common["head_dim"] = 16
    if model_type == "phi3":
        common["pad_token_id"] = 0
    common.update(overrides)
    return AutoConfig.for_model(model_type, **common)


def save_tiny_model(folder: Path, model_type: str, task: str = "causal-lm", seed: int = 0, **overrides) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    if task == "seq-cls" or model_type == "bert":
        config.num_labels = 2
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    _tiny_tokenizer(config.vocab_size).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Returns make(model_type, task='causal-lm', **overrides) -> Path of a saved tiny model (cached)."""
    cache: dict = {}

    def make(model_type: str, task: str = "causal-lm", **overrides) -> Path:
        key = (model_type, task, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{model_type}-{task}")
            cache[key] = save_tiny_model(folder, model_type, task, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")
