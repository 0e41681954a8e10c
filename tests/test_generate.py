"""Tests of `ortft generate`: greedy decoding equals transformers + PEFT token for token; sampling rules; the CLI.

Uses a tiny random Llama bundle with a LoRA adapter (tests/helpers/bundles.py).
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest

from ortft.export import export_merged_onnx
from ortft.generate import (
    Generator,
    SamplingSettings,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    next_token,
    open_generator,
)
from helpers.bundles import build_bundle
from helpers.runs import make_run


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("gen") / "bundle", "llama", seed=4)


@pytest.fixture(scope="module")
def export_dir(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen-export") / "export"
    export_merged_onnx(bundle.bundle_dir, bundle.manifest, bundle.adapter, out)
    return out


def _hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_token_id) -> list[int]:
    import torch

    with torch.no_grad():
        output = model.generate(
            input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id, pad_token_id=0,
        )
    return output[0, len(prompt_ids):].tolist()


def test_greedy_equals_transformers_peft_generate(bundle, export_dir):
    generator = Generator(export_dir, threads=1)
    for seed in range(3):
        prompt = np.random.default_rng(seed).integers(3, 320, size=5 + seed).tolist()
        ours = generator.generate_ids(prompt, SamplingSettings(max_new_tokens=24))
        peft_model = copy.deepcopy(bundle.peft_model)
        theirs = _hf_greedy(peft_model, prompt, 24, eos_token_id=generator.eos_token_ids() and sorted(generator.eos_token_ids()))
        theirs = [token for token in theirs if token not in generator.eos_token_ids()]
        assert ours == theirs
        assert len(set(ours)) > 1  # a real sequence, not one repeated token


def test_stream_stops_at_eos_and_reports_stats(export_dir):
    generator = Generator(export_dir)
    generator.folder.eos_token_ids = []
    prompt = [5, 6, 7]
    tokens = generator.generate_ids(prompt, SamplingSettings(max_new_tokens=10))
    stop_token = tokens[3]
    generator.folder.eos_token_ids = [stop_token]
    generator._tokenizer = None
    stopped = generator.generate_ids(prompt, SamplingSettings(max_new_tokens=10))
    assert stopped == tokens[: tokens.index(stop_token)]
    assert generator.stats.stopped_by == "eos" and generator.stats.prompt_tokens == 3
    generator.generate_ids(prompt, SamplingSettings(max_new_tokens=6))
    assert generator.stats.new_tokens <= 6 and "tokens/s" in generator.stats.summary()


def test_sampling_is_seeded_and_uses_temperature(export_dir):
    generator = Generator(export_dir)
    settings = SamplingSettings(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    first = generator.generate_ids([5, 6, 7], settings)
    assert first == generator.generate_ids([5, 6, 7], settings)
    greedy = generator.generate_ids([5, 6, 7], SamplingSettings(max_new_tokens=12))
    others = [generator.generate_ids([5, 6, 7], SamplingSettings(12, 1.5, 50, 0.95, 1.0, seed)) for seed in range(4)]
    assert any(sample != greedy for sample in others + [first])


def test_filters_and_penalty():
    logits = np.array([1.0, 3.0, 2.0, -1.0])
    assert np.isneginf(filter_top_k(logits, 2)).tolist() == [True, False, False, True]
    probs = np.exp(logits) / np.exp(logits).sum()  # 0.09, 0.66, 0.24, 0.01
    assert np.isneginf(filter_top_p(logits, 0.5)).tolist() == [True, False, True, True]
    assert np.isneginf(filter_top_p(logits, 0.7)).tolist() == [True, False, False, True]
    assert probs[1] > 0.5
    penalised = apply_repetition_penalty(logits, [1, 3], 2.0)
    assert penalised.tolist() == [1.0, 1.5, 2.0, -2.0]
    rng = np.random.default_rng(0)
    assert next_token(logits, [], SamplingSettings(), rng) == 1
    assert next_token(logits, [1], SamplingSettings(repetition_penalty=4.0), rng) == 2
    assert {next_token(logits, [], SamplingSettings(temperature=1.0, top_k=1), rng) for _ in range(20)} == {1}


def test_text_and_chat_streaming(export_dir):
    generator = Generator(export_dir)
    pieces = list(generator.stream_text("hello world", SamplingSettings(max_new_tokens=8)))
    ids = generator.generate_ids(generator.tokenizer.encode("hello world"), SamplingSettings(max_new_tokens=8))
    assert "".join(pieces) == generator.tokenizer.decode(ids, skip_special_tokens=True)
    chat = "".join(generator.stream_chat([{"role": "user", "content": "hi"}], SamplingSettings(max_new_tokens=4)))
    assert isinstance(chat, str)


def test_generate_from_run_and_bundle(bundle, export_dir, tmp_path):
    run = make_run(tmp_path / "run", bundle)
    prompt = [5, 6, 7, 8]
    from_run = open_generator(run).generate_ids(prompt, SamplingSettings(max_new_tokens=10))
    assert from_run == Generator(export_dir).generate_ids(prompt, SamplingSettings(max_new_tokens=10))
    base = open_generator(bundle.bundle_dir).generate_ids(prompt, SamplingSettings(max_new_tokens=10))
    assert len(base) == 10


def test_missing_provider_falls_back_to_cpu(export_dir, caplog):
    with caplog.at_level(logging.WARNING):
        generator = Generator(export_dir, provider="cuda")
    assert generator.model.session.get_providers() == ["CPUExecutionProvider"]
    assert "running on CPU instead" in caplog.text


def test_cli_prompt_and_interactive_chat(bundle, export_dir, tmp_path, capsys, monkeypatch):
    import io

    from ortft.cli import main

    main(["generate", str(export_dir), "--prompt", "hello", "--max-new-tokens", "5", "--threads", "1"])
    captured = capsys.readouterr()
    assert captured.out.endswith("\n") and "tokens/s" in captured.err
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\nhow are you\n"))
    main(["generate", str(make_run(tmp_path / "run", bundle)), "--chat", "--max-new-tokens", "3"])
    captured = capsys.readouterr()
    assert captured.err.count("tokens/s") == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(export_dir)])
    assert exit_info.value.code == 2


def test_interactive_chat_says_how_to_leave_resets_and_takes_multi_line_messages(export_dir, capsys, monkeypatch):
    import io

    from ortft.cli import main

    conversations = []
    original = Generator.stream_chat

    def recording(self, messages, settings=SamplingSettings()):
        conversations.append([dict(message) for message in messages])
        return original(self, messages, settings)

    monkeypatch.setattr(Generator, "stream_chat", recording)
    monkeypatch.setattr("sys.stdin", io.StringIO("first\\\nsecond\nagain\n/reset\nafresh\n/exit\nnever sent\n"))
    main(["generate", str(export_dir), "--chat", "--max-new-tokens", "2", "--threads", "1"])
    err = capsys.readouterr().err
    assert err.startswith("chat: type a message") and "/exit or Ctrl-D leaves" in err and "/reset starts a new conversation" in err
    assert "(a new conversation)" in err
    users = [[message["content"] for message in conversation if message["role"] == "user"] for conversation in conversations]
    assert users == [["first\nsecond"], ["first\nsecond", "again"], ["afresh"]]
    assert [message["role"] for message in conversations[1]] == ["user", "assistant", "user"]
