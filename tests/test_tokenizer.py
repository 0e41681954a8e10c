"""Tests of ortft.tokenizer on a tiny byte-level BPE tokenizer built in memory (tests/helpers/tokenizers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.tokenizers import CHATML_TEMPLATE, build_tiny_tokenizer, write_tiny_tokenizer
from ortft.errors import ModelError, TemplateError
from ortft.tokenizer import load_tokenizer


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
