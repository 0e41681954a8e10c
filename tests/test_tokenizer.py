"""Tests of ortft.tokenizer on a tiny byte-level BPE tokenizer built in memory (no downloads).

`write_tiny_tokenizer` is also used by test_data.py and test_chat_template.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ortft.errors import ModelError, TemplateError
from ortft.tokenizer import load_tokenizer

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


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    return write_tiny_tokenizer(tmp_path / "tok")


SAMPLES = [
    "hello world",
    "Answer: Paris. (capital of France)",
    "  leading spaces and unicode: héllo wörld 😀 — ünïcode\n\ttabs",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "",
]


def test_special_token_ids_and_fallback_pad(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    assert tok.bos_token_id == tok.token_to_id("<s>")
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>")
    assert tok.eos_token_ids == [tok.token_to_id("<|im_end|>")]
    assert tok.pad_token_id == tok.eos_token_id  # no pad token: falls back to eos
    assert 256 < tok.vocab_size <= 400
    assert tok.special_tokens["unk_token"] == "<|endoftext|>"  # from special_tokens_map.json


def test_pad_token_and_extra_eos(tmp_path: Path) -> None:
    folder = write_tiny_tokenizer(tmp_path / "tok", pad_token="<pad>")
    tok = load_tokenizer(folder, extra_eos_tokens=["<|endoftext|>", "<|im_end|>"])
    assert tok.pad_token_id == tok.token_to_id("<pad>")
    assert tok.eos_token_ids == [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    with pytest.raises(ModelError, match="no token"):
        load_tokenizer(folder, extra_eos_tokens=["<not-a-token>"])


def test_encode_adds_bos_from_post_processor_and_decodes(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    ids = tok.encode("hello world")
    assert ids[0] == tok.bos_token_id
    assert tok.encode("hello world", add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == "hello world"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>hello world"


def test_chat_template_from_file_wins(tmp_path: Path) -> None:
    folder = write_tiny_tokenizer(tmp_path / "tok", template_in_file=True)
    tok = load_tokenizer(folder)
    assert tok.chat_template == CHATML_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_no_chat_template_is_a_template_error(tmp_path: Path) -> None:
    tok = load_tokenizer(write_tiny_tokenizer(tmp_path / "tok", chat_template=None))
    assert tok.chat_template is None
    with pytest.raises(TemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_tokenizer_json_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_offsets_map_tokens_to_characters(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    text = "héllo <|im_end|> wörld"
    encoded = tok.encode_with_offsets(text)
    assert encoded.added_by_post_processor[0] and not any(encoded.added_by_post_processor[1:])
    end_id = tok.token_to_id("<|im_end|>")
    start, end = encoded.offsets[encoded.ids.index(end_id)]
    assert text[start:end] == "<|im_end|>"


def test_matches_transformers_fast_tokenizer(tokenizer_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    ours = load_tokenizer(tokenizer_dir)
    from_file = transformers.PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    from_object = transformers.PreTrainedTokenizerFast(tokenizer_object=build_tiny_tokenizer())
    for text in SAMPLES:
        for add_special_tokens in (True, False):
            expected = from_file(text, add_special_tokens=add_special_tokens)["input_ids"]
            assert ours.encode(text, add_special_tokens=add_special_tokens) == expected
            assert from_object(text, add_special_tokens=add_special_tokens)["input_ids"] == expected
        ids = ours.encode(text)
        assert ours.decode(ids) == from_file.decode(ids, skip_special_tokens=True)
    assert ours.bos_token_id == from_file.bos_token_id
    assert ours.eos_token_id == from_file.eos_token_id
    assert ours.vocab_size == len(from_file)

    conversations = [
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Answer: 4."}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "héllo"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "again"},
        ],
    ]
    for messages in conversations:
        for add_generation_prompt in (False, True):
            expected = from_file.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
        expected_ids = from_file.apply_chat_template(messages, tokenize=True)
        if isinstance(expected_ids, dict) or hasattr(expected_ids, "keys"):
            expected_ids = expected_ids["input_ids"]
        assert ours.encode(ours.apply_chat_template(messages), add_special_tokens=False) == list(expected_ids)


def test_device_module_does_not_import_torch_or_transformers() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ortft.tokenizer, ortft.chat_template, ortft.data\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
