"""Hostile inputs (issue 21): one test per finding, each repeating the attack on a tiny bundle, run, adapter,
data file or template and asserting the clean refusal: exit 2, the file named, nothing written or copied.

The attacker writes the manifest too (tests/helpers/hostile.py `reseal`), so only ortft's loader gate
(ortft/trust.py) and its checks of values can tell. Federated replies: tests/federated/test_hostile_replies.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers.hostile import (
    copy_bundle,
    edit_manifest,
    files_under,
    holds_secret,
    inference_graph,
    location_of,
    point_external_data,
    refused,
    reseal,
    succeeds,
    write_secret,
)
from helpers.runs import make_run
from helpers.bundles import tiny_bundle
from helpers.data import write_text_data


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
                  and {e.key: e.value for e in t.external_data}["location"] != "extra.data")
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


def test_pruning_never_follows_a_symlinked_checkpoints_folder(bundle, data, tmp_path, capsys):
    """A run whose checkpoints/ links elsewhere: resume, eval and export refuse it, and nothing outside is deleted."""
    from ortft import run as runs

    run = make_run(tmp_path / "run", bundle, steps=(1, 2, 3, 4))
    elsewhere = tmp_path / "precious"
    shutil.move(str(run / "checkpoints"), str(elsewhere))
    os.symlink(elsewhere, run / "checkpoints")
    before = files_under(elsewhere)
    refused(_train_args(bundle, data, run, "--resume", "--keep", "1"), capsys, "checkpoints is a symbolic link")
    refused(["eval", run, "--data", data, "--seq-len", "32"], capsys, "symbolic link")
    refused(["export", run, "--out", tmp_path / "export"], capsys, "symbolic link")
    with pytest.raises(Exception, match="symbolic link"):
        runs.prune_checkpoints(run, keep=1)
    assert files_under(elsewhere) == before and not (tmp_path / "export").exists()


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple, bytes]], header_bytes: int | None = None) -> Path:
    """A safetensors file written by hand: {name: (dtype, shape, raw bytes)}; `header_bytes` lies about the header."""
    import struct

    table, offset, blobs = {}, 0, []
    for name, (dtype, shape, raw) in tensors.items():
        table[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    header = json.dumps(table).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", header_bytes or len(header)) + header + b"".join(blobs))
    return path


def _as_stored(adapter: dict, dtype: str = "F32", change=None) -> dict:
    stored = {}
    for name, value in adapter.items():
        value = np.asarray(value, np.float32)
        if change is not None:
            value = change(name, value)
        if dtype == "BF16":
            stored[name] = ("BF16", value.shape, (value.view(np.uint32) >> 16).astype("<u2").tobytes())
        elif dtype == "I64":
            stored[name] = ("I64", value.shape, value.astype("<i8").tobytes())
        elif dtype == "BOOL":
            stored[name] = ("BOOL", value.shape, (value != 0).tobytes())
        else:
            stored[name] = ("F32", value.shape, value.astype("<f4").tobytes())
    return stored


def test_adapter_tensors_must_be_float_finite_and_exactly_the_bundles(bundle, data, tmp_path, capsys, caplog):
    """--init-adapter: bfloat16 is converted (with a note); int64, bool, NaN, an extra tensor and a huge header are
    refused naming the file, before the run folder exists, so the same command works again with a good file;
    export refuses a checkpoint holding NaN rather than writing a NaN model."""
    from ortft.initial_adapter import initial_parameters
    from ortft.manifest import read_manifest

    adapter = initial_parameters(bundle, read_manifest(bundle))
    first = min(adapter)
    out = tmp_path / "run"
    nan = lambda name, value: np.full_like(value, np.nan) if name == first else value
    for label, stored, message in (
        ("int64", _as_stored(adapter, "I64"), "is I64"),
        ("bool", _as_stored(adapter, "BOOL"), "is BOOL"),
        ("nan", _as_stored(adapter, change=nan), "holds NaN"),
        ("extra", {**_as_stored(adapter), "evil": ("F32", (2,), b"\0" * 8)}, "evil is not one of the bundle's"),
    ):
        path = _write_safetensors(tmp_path / f"{label}.safetensors", stored)
        refused(_train_args(bundle, data, out, "--init-adapter", path), capsys, f"{label}.safetensors", message)
        assert not out.exists(), label
    huge = _write_safetensors(tmp_path / "huge.safetensors", _as_stored(adapter), header_bytes=1 << 40)
    refused(_train_args(bundle, data, out, "--init-adapter", huge), capsys, "huge.safetensors", "header claims")
    assert not out.exists()
    succeeds(_train_args(bundle, data, out, "--init-adapter", _write_safetensors(tmp_path / "bf16.safetensors",
                                                                                   _as_stored(adapter, "BF16"))), capsys)
    assert "bfloat16 tensors; converted to float32" in caplog.text
    assert (out / "run.json").is_file()

    poisoned = make_run(tmp_path / "nan-run", bundle, adapter={k: nan(k, v) for k, v in adapter.items()})
    refused(["export", poisoned, "--out", tmp_path / "export"], capsys, "holds NaN")
    assert not (tmp_path / "export").exists()


def test_prepare_refuses_pickle_and_oversized_adapter_files(tiny_llama, tmp_path, capsys):
    """`prepare --adapter` with a pickle .bin, or a safetensors header claiming a terabyte: a clean error, no bundle."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": ["q_proj"]}), encoding="utf-8")
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    refused(["prepare", tiny_llama, "--out", tmp_path / "bundle", "--adapter", folder], capsys, "pickle")
    _write_safetensors(folder / "adapter_model.safetensors", {"w": ("F32", (2,), b"\0" * 8)}, header_bytes=1 << 40)
    refused(["prepare", tiny_llama, "--out", tmp_path / "bundle", "--adapter", folder], capsys, "adapter_model.safetensors",
            "header claims")
    assert not (tmp_path / "bundle").exists()


def test_run_and_manifest_json_are_type_checked(bundle, data, tmp_path, capsys):
    """Wrong types are exit 2 naming the file and field, not tracebacks; best.json may only name a checkpoint of
    its own run (an absolute path to another run's checkpoint was exported)."""
    from ortft import run as runs

    run = make_run(tmp_path / "run", bundle, steps=(1, 2))
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "bundle": 7}))
    refused(["export", run, "--out", tmp_path / "e1"], capsys, "run.json", "field bundle")
    (run / "run.json").write_text(json.dumps(info))

    other = make_run(tmp_path / "other", bundle, steps=(5,))
    (run / runs.BEST_FILE).write_text(json.dumps({"checkpoint": str(other / "checkpoints" / "step-00000005"), "step": 5, "eval_loss": 0.1}))
    refused(["export", run, "--out", tmp_path / "e2", "--checkpoint", "best"], capsys, "best.json", "field checkpoint")
    state_path = run / "checkpoints" / "step-00000002" / runs.STATE_FILE
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "step": "two"}))
    assert "field step" in runs.checkpoint_problem(state_path.parent)
    assert runs.resolve_checkpoint(run).name == "step-00000001"  # the damaged newest one is skipped
    assert not (tmp_path / "e1").exists() and not (tmp_path / "e2").exists()

    edit_manifest(bundle, lambda manifest: manifest["files"]["eval_model.onnx"].update(bytes="many"))
    refused(["validate", bundle], capsys, "manifest.json", "files['eval_model.onnx'].bytes")


def test_gguf_declared_sizes_are_checked_before_loading(tiny_llama, tmp_path, capsys, monkeypatch):
    """A 0.5 MB-style tiny GGUF declaring embedding_length 65536 (transformers tried to allocate 17 GB): refused
    from its metadata before anything is loaded; a model too large for the memory there is is refused too."""
    import gguf
    from helpers.tiny_gguf import write_tiny_gguf

    from ortft.errors import ModelError
    from ortft.prepare.gguf_checks import check_gguf

    honest = write_tiny_gguf(tmp_path / "honest.gguf", tiny_llama)
    check_gguf(honest)
    with pytest.raises(ModelError, match="GiB available"):
        check_gguf(honest, available=1000)
    monkeypatch.setattr(gguf.GGUFWriter, "add_embedding_length", lambda self, value: self.add_uint32("llama.embedding_length", 65536))
    lying = write_tiny_gguf(tmp_path / "lying.gguf", tiny_llama)
    refused(["prepare", lying, "--out", tmp_path / "bundle"], capsys, "lying.gguf", "embedding_length is 65536")
    assert not (tmp_path / "bundle").exists()


def test_manifests_runs_and_exports_record_no_host_paths(pristine, data, tmp_path, capsys):
    """Only names (and paths inside the folders) unless `prepare --record-source-path` asks for the source's."""
    from ortft.config import PrepareConfig
    from ortft.prepare.source_record import recorded_prepare

    manifest = json.loads((pristine / "manifest.json").read_text())
    assert not Path(manifest["source"]["path"]).is_absolute() and "/" not in manifest["source"]["path"]
    assert not any(str(value).startswith("/") for value in manifest["prepare"]["config"].values() if isinstance(value, str))
    assert not manifest["prepare"]["command"].startswith("/")
    config = PrepareConfig(model="/home/me/models/x", out="/home/me/b", record_source_path=True)
    assert recorded_prepare(config, ["/usr/bin/ortft", "prepare", "/home/me/models/x"])["config"]["model"] == "/home/me/models/x"

    succeeds(_train_args(pristine, data, tmp_path / "run"), capsys)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert not Path(info["bundle"]).is_absolute() and info["data"]["train"] == data.name
    succeeds(["export", tmp_path / "run", "--out", tmp_path / "export", "--format", "adapter"], capsys)
    source = json.loads((tmp_path / "export" / "manifest.json").read_text())["source"]
    assert source["run"] == "run" and source["checkpoint"].startswith("checkpoints/step-") and "/" not in source["bundle"]
