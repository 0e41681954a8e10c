"""Tiny random-weight models saved as Hugging Face folders: for tests, the device check and smoke benchmarks.

Built from configs (never downloaded), with a small byte-level BPE tokenizer trained in memory.
Run `python -m ortft.prepare.tiny OUT_DIR [model_type]` to write one.
"""

from __future__ import annotations

import sys
from pathlib import Path

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


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit("usage: python -m ortft.prepare.tiny OUT_DIR [model_type] [causal-lm|seq-cls]")
    model_type = args[1] if len(args) > 1 else "llama"
    task = args[2] if len(args) > 2 else "causal-lm"
    print(save_tiny_model(Path(args[0]), model_type, task))


if __name__ == "__main__":
    main()
