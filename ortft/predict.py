"""`ortft predict`: label texts with a fine-tuned classifier (seq-cls) or tag their entities (token-cls).

Input is JSONL, one `{"text": ...}` or `{"tokens": [...]}` per line; output is one JSON object per
input line, in order: the input's own fields (a gold `label`, `tags` or `entities` is left out) plus
- seq-cls: `label` (the most likely class) and `score` (its softmax probability);
- token-cls: `entities`, each `{"start", "end", "label", "text", "score"}` with character offsets into
  the text (for `tokens` input: into the tokens joined by single spaces, given as `text`), read from
  the words' tags strictly (ortft/iob2.py; `score`: the mean probability of its words' tags); with
  `tokens` input also `tags`, one IOB2 tag per token.
A word is tagged by its first sub-token, as in training (ortft/data_ner.py). Text beyond `seq_len`
tokens (or, before tokenizing, beyond 64 characters per token: ortft.config.InputLimits) is cut
(`"truncated": true`; its words are tagged O). The model is a merged-onnx export of a
classification run, or a run folder (merged into a temporary folder first). Device side: onnxruntime,
numpy, tokenizers.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bundle import CLASSIFIER_TASKS
from .config import DEFAULT_SEQ_LEN, LATEST_CHECKPOINT, InputLimits, PredictConfig, default_of
from .data import read_jsonl
from .data_ner import WordText, cut_words, first_subtokens, unlabelled_words
from .errors import BundleError, ConfigError, DataError
from .export_manifest import read_export_manifest
from .iob2 import OUTSIDE, strict_entities

GOLD_FIELDS = ("label", "score", "tags", "entities", "truncated")


@dataclass
class PredictionStats:
    lines: int = 0
    truncated: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # predicted labels (seq-cls) or entity types (token-cls)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class Classifier:
    """A merged classification export in an InferenceSession, with its tokenizer and labels."""

    def __init__(self, folder: Path | str, provider="cpu", threads: int | None = None, verbose: bool = False):
        from .generate import inference_session
        from .tokenizer import load_tokenizer

        self.folder = Path(folder)
        manifest = read_export_manifest(self.folder)
        if manifest is None:
            raise BundleError(f"{self.folder} is neither an ortft export nor a run folder",
                              hint="pass the --out folder of `ortft train` or of `ortft export --format merged-onnx`")
        from .trust import open_export

        manifest = open_export(self.folder)  # the loader gate: hashes, links, the graph's external data (ortft/trust.py)
        self.task = manifest.get("task")
        if self.task not in CLASSIFIER_TASKS:
            raise ConfigError(f"{self.folder} holds a {self.task} model; `ortft predict` labels with seq-cls and token-cls models",
                              hint="use `ortft generate` for a causal language model")
        if manifest.get("kind") != "merged-onnx" or not (self.folder / "model.onnx").is_file():
            raise BundleError(f"{self.folder} is a {manifest.get('kind')} export, without a model to run",
                              hint="export the run with --format merged-onnx, or pass the run folder")
        self.labels = list(manifest.get("labels") or [])
        self.max_seq_len = int((manifest.get("model") or {}).get("max_seq_len") or DEFAULT_SEQ_LEN)
        self.session = inference_session(self.folder / "model.onnx", provider, threads, verbose)
        self.tokenizer = load_tokenizer(self.folder / ((manifest.get("tokenizer") or {}).get("dir") or "."))
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = 0 if pad is None else pad

    def logits(self, rows: list[list[int]]) -> np.ndarray:
        """Logits of right-padded rows: [rows, labels] (seq-cls) or [rows, longest row, labels] (token-cls)."""
        width = max(len(row) for row in rows)
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for index, row in enumerate(rows):
            input_ids[index, :len(row)] = row
            attention_mask[index, :len(row)] = 1
        return self.session.run(["logits"], {"input_ids": input_ids, "attention_mask": attention_mask})[0]


def open_classifier(path: Path | str, checkpoint: str = LATEST_CHECKPOINT, provider="cpu", threads: int | None = None,
                    verbose: bool = False) -> Classifier:
    """A Classifier for an export folder, or for a run folder merged into a temporary folder first."""
    from . import run as runs

    path = Path(path)
    if not runs.is_run_dir(path):
        return Classifier(path, provider, threads, verbose)
    from .export import export_run

    temp_dir = tempfile.TemporaryDirectory(prefix="ortft-predict-")
    merged_dir = Path(temp_dir.name) / "merged"
    export_run(path, merged_dir, checkpoint=checkpoint, kind="merged-onnx")
    classifier = Classifier(merged_dir, provider, threads, verbose)
    classifier.temp_dir = temp_dir  # the session has read the model; the folder goes with the classifier
    return classifier


@dataclass
class _Line:
    record: dict
    words: WordText
    ids: list[int]
    firsts: list[int | None]  # token-cls: each word's first sub-token (None: cut off, or it has none)
    truncated: bool


def _prepare(classifier: Classifier, record: dict, where: str, seq_len: int, chars: int) -> _Line:
    """Tokenize a line: its text cut to `chars` characters before tokenizing, its tokens to `seq_len` after."""
    words = unlabelled_words(record, where)
    kept, cut = cut_words(words, chars)
    try:
        encoded = classifier.tokenizer.encode_with_offsets(kept.text, add_special_tokens=True)
    except Exception as exc:  # the Rust tokenizer's errors are plain Exceptions
        raise DataError(f"{where}: the tokenizer could not encode this text ({exc})", hint="check the text of that line") from exc
    ids = list(encoded.ids)
    firsts = []
    if classifier.task == "token-cls":
        firsts = first_subtokens(kept.text, encoded.offsets, encoded.added_by_post_processor, kept.words)
        firsts = [index if index is not None and index < seq_len else None for index in firsts]
        firsts += [None] * (len(words.words) - len(kept.words))  # words past the cut
    return _Line(record, words, ids[:seq_len], firsts, cut or len(ids) > seq_len)


def _output(classifier: Classifier, line: _Line, logits: np.ndarray) -> dict:
    result = {key: value for key, value in line.record.items() if key not in GOLD_FIELDS}
    if classifier.task == "seq-cls":
        probabilities = softmax(logits.astype(np.float64))
        best = int(probabilities.argmax())
        result.update(label=classifier.labels[best], score=float(probabilities[best]))
    else:
        probabilities = softmax(logits[:len(line.ids)].astype(np.float64))
        tags, scores = [], []
        for token in line.firsts:
            best = int(probabilities[token].argmax()) if token is not None else None
            tags.append(classifier.labels[best] if best is not None else OUTSIDE)
            scores.append(float(probabilities[token, best]) if best is not None else 1.0)
        entities = []
        for entity in strict_entities(tags):
            start, end = line.words.words[entity.start][0], line.words.words[entity.end - 1][1]
            entities.append({"start": start, "end": end, "label": entity.type, "text": line.words.text[start:end],
                             "score": float(np.mean(scores[entity.start:entity.end]))})
        if "tokens" in line.record:
            result.update(text=line.words.text, tags=tags)
        result["entities"] = entities
    if line.truncated:
        result["truncated"] = True
    return result


def predict_records(classifier: Classifier, path: Path | str, batch_size: int = default_of(PredictConfig, "batch_size"),
                    seq_len: int | None = None, stats: PredictionStats | None = None) -> Iterator[dict]:
    """One output object per line of the JSONL file `path`, in order. Bad lines raise DataError (file, line)."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be at least 1")
    seq_len = min(seq_len or classifier.max_seq_len, classifier.max_seq_len)
    if seq_len < 2:
        raise ConfigError(f"--seq-len {seq_len} must be at least 2")
    stats = stats if stats is not None else PredictionStats()
    limits = InputLimits()
    chars = limits.example_chars(seq_len)
    _sha256, records = read_jsonl(Path(path), limits.line_bytes(chars))  # no line past the cap
    lines = [_prepare(classifier, record, f"{path}, line {number}", seq_len, chars) for number, record in records]
    for start in range(0, len(lines), batch_size):
        chunk = lines[start:start + batch_size]
        logits = classifier.logits([line.ids for line in chunk])
        for line, row in zip(chunk, logits):
            result = _output(classifier, line, row)
            stats.lines += 1
            stats.truncated += int(line.truncated)
            for name in [result["label"]] if "label" in result else [e["label"] for e in result["entities"]]:
                stats.counts[name] = stats.counts.get(name, 0) + 1
            yield result


def format_line(result: dict) -> str:
    return json.dumps(result, ensure_ascii=False)
