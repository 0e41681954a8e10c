"""Hostile inputs (issue 21): one test per finding, each repeating the attack on a tiny bundle, run, adapter,
data file or template and asserting the clean refusal: exit 2, the file named, nothing written or copied.

The attacker writes the manifest too (tests/hostile.py `reseal`), so only ortft's loader gate
(ortft/trust.py) and its checks of values can tell. Federated replies: tests/federated/test_hostile_replies.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from hostile import (
    copy_bundle,
    edit_manifest,
    inference_graph,
    location_of,
    files_under,
    holds_secret,
    make_run,
    point_external_data,
    refused,
    reseal,
    succeeds,
    write_secret,
)
from train_helpers import tiny_bundle, write_text_data


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_llama) -> Path:
    """The tiny llama bundle (training graphs, inference template, tokenizer), never modified."""
    return tiny_bundle(tmp_path_factory, tiny_llama, "llama-hostile")


@pytest.fixture
def bundle(pristine, tmp_path) -> Path:
    return copy_bundle(pristine, tmp_path / "bundle")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_text_data(tmp_path_factory.mktemp("hostile-data") / "train.jsonl", 8)


def _train_args(bundle: Path, data: Path, out: Path, *extra) -> list:
    return ["train", bundle, "--data", data, "--out", out, "--steps", "1", "--seq-len", "32", "--batch-size", "2",
            "--threads", "1", "--eval-every", "100", *extra]


# ---- High: ONNX external data ------------------------------------------------------------------------


def test_external_data_outside_the_bundle_is_refused_by_every_command(bundle, data, tmp_path, capsys):
    """The inference template reads `../secret/id_rsa` (hashes recomputed): validate, train, info, export and
    generate refuse it, naming the graph; nothing is exported or generated, the secret is copied nowhere."""
    secret = write_secret(tmp_path)
    graph = inference_graph(bundle)
    name = point_external_data(graph, location_of(secret, graph))
    reseal(bundle)
    graph_name = graph.relative_to(bundle).as_posix()
    for argv in (["validate", bundle, "--no-train-step"], ["info", bundle], _train_args(bundle, data, tmp_path / "run"),
                 ["generate", bundle, "--prompt", "hi", "--max-new-tokens", "2"]):
        refused(argv, capsys, graph_name, name, "not a file inside the folder")
    assert not (tmp_path / "run").exists()
    run = make_run(tmp_path / "made-run", bundle)
    refused(["export", run, "--out", tmp_path / "export"], capsys, graph_name)
    assert not (tmp_path / "export").exists() and not holds_secret(tmp_path / "made-run")


def test_training_graphs_reading_an_absolute_path_are_refused(bundle, data, tmp_path, capsys):
    """training_model.onnx and eval_model.onnx read a frozen weight from an absolute path outside the bundle (a
    copy of the real data, so ORT would train): validate and train refuse, no run folder is made."""
    outside = tmp_path / "elsewhere" / "frozen_weights.data"
    outside.parent.mkdir()
    shutil.copyfile(bundle / "frozen_weights.data", outside)
    for graph in ("training_model.onnx", "eval_model.onnx"):
        point_external_data(bundle / graph, str(outside), max_bytes=outside.stat().st_size)
    reseal(bundle)
    refused(["validate", bundle], capsys, "training_model.onnx", "not a file inside the folder")
    refused(_train_args(bundle, data, tmp_path / "run"), capsys, "training_model.onnx")
    assert not (tmp_path / "run").exists()


def test_external_data_beyond_its_file_or_unlisted_is_refused(bundle, tmp_path, capsys):
    """A location inside the bundle that the manifest does not list, and an offset past the end of a listed file."""
    import onnx

    graph = inference_graph(bundle)
    (graph.parent / "extra.data").write_bytes(b"\0" * 4096)
    point_external_data(graph, "extra.data")
    reseal(bundle)
    refused(["validate", bundle, "--no-train-step"], capsys, "extra.data", "does not list")
    model = onnx.load(str(graph), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                  and dict((e.key, e.value) for e in t.external_data)["location"] != "extra.data")
    for entry in tensor.external_data:
        if entry.key == "offset":
            entry.value = str(10**9)
    graph.write_bytes(model.SerializeToString())
    reseal(bundle)
    refused(["validate", bundle, "--no-train-step"], capsys, graph.relative_to(bundle).as_posix(), ", which has")


# ---- High: symbolic links and unlisted files ----------------------------------------------------------


def test_symlinks_and_unlisted_files_are_never_followed_or_copied(bundle, tmp_path, capsys):
    """`tokenizer -> ~/.ssh`-style link: every command refuses it by name. An unlisted tokenizer/notes.txt
    linking to the secret is never copied into an export; a listed file that is a link is refused."""
    secret = write_secret(tmp_path)
    fake_ssh = secret.parent
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        shutil.copyfile(bundle / "tokenizer" / name, fake_ssh / name)
    shutil.rmtree(bundle / "tokenizer")
    os.symlink(fake_ssh, bundle / "tokenizer")
    reseal(bundle)
    run = make_run(tmp_path / "run", bundle)
    for argv in (["validate", bundle, "--no-train-step"], ["info", bundle], ["export", run, "--out", tmp_path / "export"],
                 ["generate", bundle, "--prompt", "hi", "--max-new-tokens", "2"]):
        refused(argv, capsys, "tokenizer", "symbolic link")
    assert not (tmp_path / "export").exists()

    os.unlink(bundle / "tokenizer")
    shutil.copytree(fake_ssh, bundle / "tokenizer", ignore=shutil.ignore_patterns("id_rsa"))
    os.symlink(secret, bundle / "tokenizer" / "notes.txt")  # unlisted: export must not copy it
    reseal(bundle)
    run = make_run(tmp_path / "run2", bundle)
    succeeds(["export", run, "--out", tmp_path / "export"], capsys)
    assert "notes.txt" not in files_under(tmp_path / "export") and not holds_secret(tmp_path / "export")
    written = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert "notes.txt" not in written["files"]

    reseal(bundle, add=("tokenizer/notes.txt",))  # now listed, but a link: refused
    refused(["export", make_run(tmp_path / "run3", bundle), "--out", tmp_path / "export2"], capsys, "tokenizer/notes.txt",
            "symbolic link")
    assert not (tmp_path / "export2").exists()


# ---- Medium: chat templates ---------------------------------------------------------------------------


def test_jinja2_is_at_least_3_1_6_and_the_format_escape_is_closed(monkeypatch):
    """CVE-2025-27516: in jinja2 3.1.5 `|attr('format')` handed a template the unwrapped str.format, which read
    an environment variable through a global's __globals__; the pin and the sandbox refuse it."""
    import importlib.metadata

    from ortft.chat_template import ChatTemplate
    from ortft.errors import TemplateError

    requirement = next(line for line in (Path(__file__).parents[1] / "pyproject.toml").read_text().splitlines() if '"jinja2' in line)
    assert "jinja2>=3.1.6" in requirement
    assert tuple(int(part) for part in importlib.metadata.version("jinja2").split(".")[:3]) >= (3, 1, 6)
    monkeypatch.setenv("ORTFT_CANARY", "leaked-value")
    payload = "{{ ('{0.__globals__[os].environ[ORTFT_CANARY]}'|attr('format'))(raise_exception) }}"
    with pytest.raises(TemplateError, match="sandbox"):
        ChatTemplate(payload).render([{"role": "user", "content": "hi"}])


def _with_template(bundle: Path, source: str) -> Path:
    (bundle / "tokenizer" / "chat_template.jinja").write_text(source, encoding="utf-8")
    reseal(bundle)
    return bundle


def _chat_data(path: Path, turns: int = 1) -> Path:
    messages = []
    for i in range(turns):
        messages += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    path.write_text("".join(json.dumps({"messages": messages}) + "\n" for _ in range(4)), encoding="utf-8")
    return path


@pytest.mark.parametrize("source, message", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages[0].content }}", "longer than"),
    ("{{ 'x' * 10**9 }}", "more than"),
    ("{{ lipsum(10**6) }}", "'lipsum' is undefined"),
])
def test_chat_templates_render_with_a_time_limit_and_a_size_cap(bundle, tmp_path, capsys, source, message):
    """Nested loops that hung train and generate --chat, a 1 GB string, jinja2's lipsum: each stopped, exit 2."""
    import time

    _with_template(bundle, source)
    started = time.monotonic()
    refused(_train_args(bundle, _chat_data(tmp_path / "chat.jsonl"), tmp_path / "run"), capsys, "chat template", message)
    refused(["generate", bundle, "--chat", "--prompt", "hi", "--max-new-tokens", "2"], capsys, "chat template", message)
    assert time.monotonic() - started < 60 and not (tmp_path / "run").exists()


# ---- Medium: data ---------------------------------------------------------------------------------------


def test_a_huge_line_is_refused_before_it_is_read_whole(bundle, tmp_path, capsys):
    """A 2 MB line (855 MB and a tokenizer abort before): refused by the line cap derived from --seq-len, naming
    the line and the flag that raises the cap; a long text within the cap is cut before tokenizing."""
    import time

    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "word " * 400_000}) + "\n", encoding="utf-8")
    started = time.monotonic()
    refused(_train_args(bundle, path, tmp_path / "run"), capsys, "long.jsonl, line 2", "--max-example-chars")
    assert time.monotonic() - started < 30 and not (tmp_path / "run").exists()

    from ortft.data import DataConfig, load_dataset
    from ortft.tokenizer import load_tokenizer

    path.write_text(json.dumps({"text": "word " * 2_000}) + "\n", encoding="utf-8")  # 10,000 characters: within the line cap
    config = DataConfig(seq_len=32, batch_size=2, seed=0)
    data = load_dataset(path, load_tokenizer(bundle / "tokenizer"), config)
    assert config.example_chars == 32 * 64 and data.stats.num_truncated == 1 and len(data.examples[0].input_ids) == 32


def test_many_chat_turns_find_their_spans_in_linear_time():
    """4000 turns took 34 s (two renders per reply); one marked render finds them all, the same spans."""
    import time

    from ortft.chat_template import ChatTemplate

    source = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    messages = []
    for i in range(2000):
        messages += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    started = time.monotonic()
    rendered = ChatTemplate(source, {"eos_token": "<|im_end|>"}).render_with_assistant_spans(messages)
    assert time.monotonic() - started < 3
    assert [rendered.text[a:b] for a, b in rendered.assistant_spans] == [f"a{i}<|im_end|>" for i in range(2000)]


def test_chat_examples_keep_at_most_seq_len_turns(bundle, tmp_path, monkeypatch):
    """A chat is cut to --seq-len messages before it is rendered (each renders at least one token) and counted."""
    from ortft.chat_template import ChatTemplate
    from ortft.data import DataConfig, load_dataset
    from ortft.tokenizer import load_tokenizer

    rendered_turns = []
    original = ChatTemplate.render_with_assistant_spans
    monkeypatch.setattr(ChatTemplate, "render_with_assistant_spans",
                        lambda self, messages, **extra: rendered_turns.append(len(messages)) or original(self, messages, **extra))
    data = load_dataset(_chat_data(tmp_path / "chat.jsonl", turns=100), load_tokenizer(bundle / "tokenizer"),
                        DataConfig(seq_len=16, batch_size=2, seed=0, mask_prompt=False))
    assert rendered_turns == [16] * 4 and data.stats.num_truncated == 4


# ---- Medium: generate -------------------------------------------------------------------------------------


def test_generate_verifies_hashes_refuses_overlong_prompts_and_stops_at_the_context(bundle, tmp_path, capsys):
    from ortft.generate import Generator
    from ortft.trust import context_length, open_bundle

    context = context_length(bundle, open_bundle(bundle))
    generator = Generator(bundle)
    prompt = [5] * (context - 3)
    assert len(generator.generate_ids(prompt, __import__("ortft.config", fromlist=["x"]).SamplingSettings(max_new_tokens=10**9))) <= 3
    assert generator.stats.stopped_by in ("context", "eos")
    refused(["generate", bundle, "--prompt", "hello " * (context + 10), "--max-new-tokens", "2"], capsys, "more than the model's context")
    refused(["generate", bundle, "--prompt", "x" * (context * 64 + 1)], capsys, "characters")

    with open(bundle / "tokenizer" / "tokenizer.json", "ab") as handle:  # tampered after the manifest was written
        handle.write(b" ")
    refused(["generate", bundle, "--prompt", "hi", "--max-new-tokens", "2"], capsys, "tokenizer/tokenizer.json")


# ---- Low ------------------------------------------------------------------------------------------------------


def test_a_tokenizer_regex_panic_is_a_user_error(bundle, tmp_path, capsys):
    """A pre-tokenizer regex that backtracks past onig's limit makes the tokenizers library panic (PanicException,
    a BaseException): now an error naming the line, exit 2."""
    path = bundle / "tokenizer" / "tokenizer.json"
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    tokenizer["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "((a+)+)+b"}, "behavior": "Isolated", "invert": False}
    path.write_text(json.dumps(tokenizer), encoding="utf-8")
    reseal(bundle)
    data = tmp_path / "a.jsonl"
    data.write_text(json.dumps({"text": "a" * 5000 + "c"}) + "\n", encoding="utf-8")
    refused(_train_args(bundle, data, tmp_path / "run"), capsys, "a.jsonl, line 1", "tokenizer crashed")
    assert not (tmp_path / "run").exists()
