"""Exports of classification runs (ortft/export_classifier.py): the merged ONNX classifier gives PyTorch+PEFT's
logits and the eval graph's, `--format peft` loads with AutoModelFor*Classification + PeftModel, and the
formats that serve causal LMs are refused.

Bundles are tiny random models prepared once per session (tests/helpers/bundles.py); nothing is downloaded.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from helpers.reference import batch_for, randomize_adapters, torch_peft_model
from helpers.runs import make_run
from helpers.bundles import tiny_bundle

from ortft.errors import ConfigError
from ortft.export import export_run
from ortft.manifest import read_manifest
from ortft.runtime import TrainingSession

NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
CASES = {
    "bert-token-cls": ("bert", "seq-cls", {"task": "token-cls", "labels": NER_LABELS}),
    "llama-token-cls-dora": ("llama", "causal-lm", {"task": "token-cls", "labels": NER_LABELS, "dora": True}),
    "bert-seq-cls": ("bert", "seq-cls", {"task": "seq-cls", "labels": ["negative", "positive"]}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request, tiny_model_factory, tmp_path_factory):
    """(model folder, bundle, manifest, a run whose checkpoint holds random adapters, those adapters, the eval graph's logits, batch)."""
    model_type, folder_task, settings = CASES[request.param]
    model_dir = tiny_model_factory(model_type, folder_task)
    bundle = tiny_bundle(tmp_path_factory, model_dir, f"export-{request.param}", **settings)
    manifest = read_manifest(bundle)
    session = TrainingSession(bundle, threads=1)
    adapter = randomize_adapters(session, manifest)
    batch = batch_for(manifest)
    eval_logits = np.asarray(session.evaluate(batch)[1])
    run_dir = make_run(tmp_path_factory.mktemp(f"run-{request.param}") / "run", SimpleNamespace(bundle_dir=bundle, adapter=adapter))
    return SimpleNamespace(model_dir=model_dir, bundle=bundle, manifest=manifest, run=run_dir, adapter=adapter,
                           eval_logits=eval_logits, batch=batch)


def onnx_classifier_logits(model_path, batch: dict) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})[0]


def torch_classifier_logits(model, batch: dict) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(batch["input_ids"]), attention_mask=torch.from_numpy(batch["attention_mask"])).logits.numpy()


def _counted(logits: np.ndarray, batch: dict) -> np.ndarray:
    """The logits that mean something: every row (seq-cls), the non-padding positions (token-cls)."""
    return logits if logits.ndim == 2 else logits[batch["attention_mask"] == 1]


def test_merged_export_gives_peft_and_eval_graph_logits(trained, tmp_path):
    manifest = export_run(trained.run, tmp_path / "export")
    assert manifest["kind"] == "merged-onnx" and manifest["labels"] == trained.manifest["labels"]
    assert manifest["task"] == trained.manifest["task"]
    assert {"model.onnx", "model.onnx.data", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert not {"genai_config.json", "generation_config.json"} & set(manifest["files"])  # a causal LM's serving files
    merged = onnx_classifier_logits(tmp_path / "export" / "model.onnx", trained.batch)
    reference = torch_classifier_logits(torch_peft_model(trained.manifest, trained.model_dir, trained.adapter), trained.batch)
    base = onnx_classifier_logits(trained.bundle / "inference" / "model.onnx", trained.batch)
    assert np.abs(_counted(base - reference, trained.batch)).max() > 1e-2  # the adapter and the head matter
    np.testing.assert_allclose(_counted(merged, trained.batch), _counted(reference, trained.batch), atol=1e-4, rtol=0)
    np.testing.assert_allclose(_counted(merged, trained.batch), _counted(trained.eval_logits, trained.batch), atol=1e-4, rtol=0)


def test_peft_export_loads_with_auto_model_and_peft(trained, tmp_path):
    from peft import PeftModel
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    export_run(trained.run, tmp_path / "peft", kind="peft")
    auto = AutoModelForTokenClassification if trained.manifest["task"] == "token-cls" else AutoModelForSequenceClassification
    base = auto.from_pretrained(str(trained.model_dir), num_labels=len(trained.manifest["labels"]), ignore_mismatched_sizes=True,
                                attn_implementation="eager")
    model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    expected = torch_classifier_logits(torch_peft_model(trained.manifest, trained.model_dir, trained.adapter), trained.batch)
    np.testing.assert_allclose(_counted(torch_classifier_logits(model, trained.batch), trained.batch),
                               _counted(expected, trained.batch), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind,options,message", [
    ("gguf", {}, "--format gguf serves causal language models"),
    ("gguf-lora", {}, "--format gguf-lora serves causal language models"),
    ("onnx-adapter", {}, "--format onnx-adapter serves causal language models"),
    ("merged-onnx", {"quantize": "int8"}, "--quantize applies to causal language models"),
])
def test_causal_lm_formats_are_refused(trained, tmp_path, kind, options, message):
    with pytest.raises(ConfigError, match=message):
        export_run(trained.run, tmp_path / "out", kind=kind, **options)
    assert not (tmp_path / "out").exists()
