"""A GGUF's tokenizer keeps the GGUF's own special tokens, BOS/EOS behaviour and byte-level decoder (issue 19).

A tiny llama GGUF with a GPT-2 style vocabulary is written in a fixture (tests/helpers/tiny_gguf.py), so
every test sees what transformers' converter makes of it and what ortft makes of it; the real SmolLM2
GGUF is checked by the slow tests at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ortft.data import DataConfig, _ExampleBuilder
from ortft.errors import UserError
from ortft.prepare import source as sources
from ortft.prepare.gguf_tokenizer import tokenizer_source_facts
from ortft.prepare.pipeline import _save_tokenizer
from ortft.tokenizer import load_tokenizer
from ortft.tokenizer_facts import ROUND_TRIP_TEXTS

from helpers.tiny_gguf import write_tiny_gguf, write_tiny_spm_gguf

TWO_TURNS = [{"role": "user", "content": "What is 6 x 7?"}, {"role": "assistant", "content": "It is 42."}]


@pytest.fixture(scope="module")
def gguf_factory(tiny_llama, tmp_path_factory):
    """make(**fields) -> path of a tiny GGUF written with those tokenizer fields (see write_tiny_gguf)."""
    made: dict = {}

    def make(**fields) -> Path:
        key = json.dumps(fields, sort_keys=True)
        if key not in made:
            made[key] = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_llama, **fields)
        return made[key]

    return make


def _tokenizer(path: Path):
    return sources.load_tokenizer(sources.resolve_source(str(path), None))


def _saved(tokenizer, folder: Path):
    """The tokenizer as the bundle holds it and the device loads it."""
    _save_tokenizer(tokenizer, folder)
    return load_tokenizer(folder)


def _text_example(tokenizer, text: str):
    return _ExampleBuilder(tokenizer, DataConfig(seq_len=128, batch_size=1, seed=0)).build({"text": text}, "text", "test", 1)


def test_transformers_converter_gets_this_gguf_wrong(gguf_factory):
    """The upstream bug the fixture reproduces (if this fails, transformers fixed its GGUF converter)."""
    from transformers import AutoTokenizer

    path = gguf_factory()
    converted = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert converted.eos_token == "<|im_start|>" and converted.eos_token_id == 1  # the GGUF says 2, <|im_end|>
    assert converted("hello")["input_ids"][0] == 1  # BOS added, the GGUF says add_bos_token = false


def test_special_tokens_and_bos_behaviour_come_from_the_gguf(gguf_factory, tmp_path):
    tokenizer = _tokenizer(gguf_factory())
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert tokenizer.pad_token_id == 2
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    assert state["decoder"]["type"] == "ByteLevel"  # plain, no ByteFallback / Fuse / Replace in front
    assert state["post_processor"]["type"] == "ByteLevel"  # no BOS template
    assert state["normalizer"] is None and state["model"]["byte_fallback"] is False
    assert [p["type"] for p in state["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]  # pre = smollm

    device = _saved(tokenizer, tmp_path / "tokenizer")
    assert (device.eos_token_id, device.bos_token_id) == (2, 1)
    assert device.encode("hello world") == device.encode("hello world", add_special_tokens=False)  # no BOS
    config = json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["add_bos_token"] is False


def test_round_trip_is_exact(gguf_factory, tmp_path):
    device = _saved(_tokenizer(gguf_factory()), tmp_path / "tokenizer")
    for text in ROUND_TRIP_TEXTS:
        assert device.decode(device.encode(text, add_special_tokens=False), skip_special_tokens=False) == text
        assert device.decode(device.encode(text)) == text


def test_text_example_ends_with_the_gguf_eos_and_has_no_bos(gguf_factory, tmp_path):
    device = _saved(_tokenizer(gguf_factory()), tmp_path / "tokenizer")
    example = _text_example(device, "The capital of France is Paris.")
    assert example.input_ids[-1] == 2 and example.labels[-1] == 2  # <|im_end|>, as the GGUF names it
    assert example.input_ids[0] != 1 and 1 not in example.input_ids  # no <|im_start|> anywhere


def test_another_eos_and_add_bos_follow_the_gguf(gguf_factory, tmp_path):
    """EOS <|endoftext|> (id 0) and add_bos_token = true: the bundle follows the file, not a fixed choice."""
    device = _saved(_tokenizer(gguf_factory(eos_token_id=0, pad_token_id=None, add_bos_token=True)), tmp_path / "tokenizer")
    assert device.eos_token_id == 0
    ids = device.encode("hello world")
    assert ids[0] == 1 and ids[1:] == device.encode("hello world", add_special_tokens=False)  # exactly one BOS
    example = _text_example(device, "hello world")
    assert example.input_ids[0] == 1 and example.labels[-1] == 0
    assert device.decode(ids) == "hello world"


def test_missing_flags_take_llama_cpp_defaults(gguf_factory):
    path = gguf_factory(add_bos_token=None, add_eos_token=None)
    tokenizer = _tokenizer(path)
    assert tokenizer("hello")["input_ids"] == tokenizer("hello", add_special_tokens=False)["input_ids"]
    facts = tokenizer_source_facts(sources.resolve_source(str(path), None), tokenizer)
    assert facts["add_bos_token"] is False and facts["defaulted"] == ["add_bos_token", "add_eos_token"]


def test_chat_ids_are_the_rendered_template_without_extra_bos(gguf_factory, tmp_path):
    """Chat training tokenizes exactly what the template renders; transformers reads the saved folder alike."""
    from transformers import AutoTokenizer

    folder = tmp_path / "tokenizer"
    device = _saved(_tokenizer(gguf_factory()), folder)
    rendered = device.apply_chat_template(TWO_TURNS)
    example = _ExampleBuilder(device, DataConfig(seq_len=128, batch_size=1, seed=0)).build({"messages": TWO_TURNS}, "chat", "t", 1)
    assert example.input_ids == device.encode(rendered, add_special_tokens=False)
    assert rendered.startswith("<|im_start|>user") and example.input_ids[0] == 1 and example.input_ids[1] != 1
    hf = AutoTokenizer.from_pretrained(str(folder))
    assert hf.eos_token == "<|im_end|>" and hf.apply_chat_template(TWO_TURNS, tokenize=False) == rendered
    assert hf(rendered, add_special_tokens=False)["input_ids"] == example.input_ids
    assert hf.decode(hf("café 🙂 12")["input_ids"]) == "café 🙂 12"


def test_source_facts_record_the_gguf(gguf_factory, tiny_llama):
    path = gguf_factory()
    facts = tokenizer_source_facts(sources.resolve_source(str(path), None), _tokenizer(path))
    assert facts["facts_from"] == "gguf" and facts["tokenizer_model"] == "gpt2" and facts["pre_tokenizer"] == "smollm"
    assert (facts["eos_token_id"], facts["eos_token"], facts["bos_token_id"]) == (2, "<|im_end|>", 1)
    assert facts["add_bos_token"] is False and facts["add_eos_token"] is False
    hf_source = sources.resolve_source(str(tiny_llama), None)
    hf_facts = tokenizer_source_facts(hf_source, sources.load_tokenizer(hf_source))
    assert hf_facts["facts_from"] == "tokenizer files" and hf_facts["eos_token_id"] == 2
    assert hf_facts["add_bos_token"] is True  # the tiny Hugging Face tokenizer's own template adds <|im_start|>


def test_a_hugging_face_folder_keeps_its_tokenizer(tiny_llama, tmp_path):
    tokenizer = sources.load_tokenizer(sources.resolve_source(str(tiny_llama), None))
    saved = json.loads(tokenizer.backend_tokenizer.to_str())
    original = json.loads((tiny_llama / "tokenizer.json").read_text())
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "model"):
        assert saved[key] == original[key], key
    device = _saved(tokenizer, tmp_path / "tokenizer")
    assert device.encode("hello")[0] == 1  # its own post-processor's BOS stays


def test_prepare_from_a_gguf_records_the_facts_and_validates(gguf_factory, tmp_path):
    from ortft.validate import validate_bundle

    from helpers.bundles import prepare_tiny

    manifest = prepare_tiny(gguf_factory(), tmp_path / "bundle")
    section = manifest["tokenizer"]
    assert (section["eos_token"], section["bos_token"], section["add_bos_token"]) == ("<|im_end|>", "<|im_start|>", False)
    assert section["source_facts"]["facts_from"] == "gguf" and section["source_facts"]["eos_token_id"] == 2
    assert manifest["model"]["eos_token_ids"] == [2]
    checks = {name: ok for name, ok, _detail in validate_bundle(tmp_path / "bundle", threads=1, train_step=False).checks}
    assert checks["tokenizer special tokens match the source"] and checks["tokenizer round trip"]
    assert sorted(p.name for p in (tmp_path / "bundle" / "tokenizer").iterdir()) == [
        "chat_template.jinja", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("add_bos", [None, False])
def test_a_sentencepiece_gguf_keeps_its_decoder_and_gets_its_own_eos(add_bos, tmp_path):
    """`tokenizer.ggml.model = llama`: EOS </s> (the converter says <s>); BOS as the GGUF says (absent: added)."""
    path = write_tiny_spm_gguf(tmp_path / "spm.gguf", add_bos_token=add_bos)
    tokenizer = _tokenizer(path)
    assert (tokenizer.eos_token, tokenizer.bos_token) == ("</s>", "<s>")
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    assert [step["type"] for step in state["decoder"]["decoders"]] == ["ByteFallback", "Fuse", "Replace", "Strip"]
    device = _saved(tokenizer, tmp_path / "tokenizer")
    adds_bos = add_bos is None  # llama.cpp adds BOS to SentencePiece vocabularies unless told otherwise
    assert (device.encode("hello world")[0] == 1) is adds_bos
    text = "hello world café 123\n  x"
    assert device.decode(device.encode(text)) == text
    assert device.decode(device.encode(text, add_special_tokens=False), skip_special_tokens=False) == text
    example = _text_example(device, "hello world")
    assert example.labels[-1] == 2 and example.input_ids.count(1) == int(adds_bos)


def test_an_eos_id_outside_the_vocabulary_is_a_user_error(gguf_factory):
    path = gguf_factory(eos_token_id=100000)
    with pytest.raises(UserError) as raised:
        _tokenizer(path)
    assert "eos_token_id = 100000" in raised.value.message and raised.value.hint


# ---- SmolLM2-135M-Instruct, the real GGUF ---------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2-tokenizer") / "tokenizer"
    return _saved(_tokenizer(smollm2_dir), folder), folder


@pytest.mark.slow
def test_smollm2_eos_is_im_end_and_no_bos_is_added(smollm2_tokenizer):
    device, folder = smollm2_tokenizer
    assert device.eos_token_id == 2 and device.decode([2], skip_special_tokens=False) == "<|im_end|>"
    assert device.bos_token_id == 1
    assert device.encode("The capital of France is") == device.encode("The capital of France is", add_special_tokens=False)
    example = _text_example(device, "The capital of France is Paris.")
    assert example.labels[-1] == 2 and 1 not in example.input_ids
    state = json.loads((folder / "tokenizer.json").read_text())
    assert state["decoder"]["type"] == "ByteLevel" and state["post_processor"]["type"] == "ByteLevel"


@pytest.mark.slow
def test_smollm2_round_trip_and_chat(smollm2_tokenizer):
    device, _folder = smollm2_tokenizer
    for text in ROUND_TRIP_TEXTS:
        assert device.decode(device.encode(text)) == text
    rendered = device.apply_chat_template(TWO_TURNS)
    example = _ExampleBuilder(device, DataConfig(seq_len=256, batch_size=1, seed=0)).build({"messages": TWO_TURNS}, "chat", "t", 1)
    assert example.input_ids == device.encode(rendered, add_special_tokens=False)
    assert example.input_ids.count(1) == 3  # one <|im_start|> per turn (system, user, assistant), none extra


@pytest.mark.slow
def test_smollm2_token_ids_equal_transformers_conversion_without_its_bos(smollm2_tokenizer, smollm2_dir):
    """The vocabulary and merges are transformers' (right); only the BOS in front and the decoder differ."""
    from transformers import AutoTokenizer

    root = Path(__file__).resolve().parents[2]
    texts = [json.loads(line) for line in (root / "data/sft/valid.jsonl").read_text().splitlines() if line.strip()]
    texts = [message["content"] for record in texts for message in record.get("messages", [])] + list(ROUND_TRIP_TEXTS)
    assert len(texts) > 10
    device, _folder = smollm2_tokenizer
    converted = AutoTokenizer.from_pretrained(str(smollm2_dir), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    for text in texts:
        assert device.encode(text) == converted(text, add_special_tokens=False)["input_ids"], text
