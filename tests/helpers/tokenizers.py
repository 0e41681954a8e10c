"""A tiny byte-level BPE tokenizer built in memory (no downloads), with ChatML special tokens, and its
Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a tiny assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<s>", "<|im_start|>", "<|im_end|>", "<pad>"]

TRAINING_TEXT = [
    "hello world, the answer is 42.",
    "Answer: Paris. (capital of France)",
    "What is the capital of Italy? Rome is the capital.",
    "Convert 3 km to meters: 3000 m because 1 km = 1000 m.",
    "The opposite of hot is cold; the plural of mouse is mice.",
    "user assistant system You are a tiny assistant.",
]


def build_tiny_tokenizer(bos_in_post_processor: bool = True):
    """A byte-level BPE over a few sentences, with ChatML special tokens; BOS added by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 10, trainer)
    if bos_in_post_processor:
        bos_id = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    return tokenizer


def write_tiny_tokenizer(
    folder: Path,
    chat_template: str | None = CHATML_TEMPLATE,
    pad_token: str | None = None,
    template_in_file: bool = False,
    bos_in_post_processor: bool = True,
) -> Path:
    """Save the tiny tokenizer as a Hugging Face folder: tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    folder.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(bos_in_post_processor).save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        # The AddedToken form transformers writes for a special token (ours reads "content").
        "eos_token": {
            "__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True,
        },
        "model_max_length": 512,
    }
    if pad_token is not None:
        config["pad_token"] = pad_token
    if chat_template is not None and not template_in_file:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({"unk_token": "<|endoftext|>"}), encoding="utf-8")
    if chat_template is not None and template_in_file:
        (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return folder
