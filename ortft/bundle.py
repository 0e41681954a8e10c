"""The bundle folder's single owner of names: the files `ortft prepare` writes, and a typed view of its manifest.

`BundleManifest` is the manifest dict (ortft/manifest.py reads and checks it against ortft/schemas.py)
with read-only properties for the keys the device uses; rare keys stay reachable as dict items.
docs/bundle-format.md describes every file and key.
"""

from __future__ import annotations

from pathlib import Path

MANIFEST_NAME = "manifest.json"
TRAINING_GRAPH = "training_model.onnx"  # forward + loss + gradients, standard ONNX
EVAL_GRAPH = "eval_model.onnx"  # forward + loss
GRAPH_FILES = (TRAINING_GRAPH, EVAL_GRAPH)
INITIAL_ADAPTER = "initial_adapter.safetensors"  # the trainable tensors' starting values
FROZEN_DATA = "frozen_weights.data"  # the frozen float weights, initializers of both graphs
QUANTIZED_DATA = "quantized_weights.data"  # present in QLoRA bundles (ortft/prepare/artifacts.py)
INFERENCE_TEMPLATE = "inference_model.onnx"  # causal-lm: the base model with KV cache, sharing the weights
INFERENCE_TEMPLATE_DATA = "inference_model.onnx.data"  # only for weights the training graphs do not store
TOKENIZER_DIR = "tokenizer"
# A bundle for ORT's deprecated training API (format_version 1): its ORT checkpoint (the adapter's starting
# values) and the files `ortft upgrade` drops.
TRAINING_API_CHECKPOINT = "checkpoint"
TRAINING_API_FILES = (TRAINING_API_CHECKPOINT, "checkpoint.data", "optimizer_model.onnx")

CLASSIFIER_TASKS = ("seq-cls", "token-cls")


class BundleManifest(dict):
    """A bundle's manifest.json: the dict itself, with typed properties for what the device reads.

    Made by `ortft.manifest.read_manifest` (after its schema check) and `write_manifest`; `of()` wraps a
    plain dict (tests, callers that built one). The properties only read.
    """

    @classmethod
    def of(cls, manifest: dict) -> BundleManifest:
        return manifest if isinstance(manifest, cls) else cls(manifest)

    @property
    def task(self) -> str:
        return self["task"]

    @property
    def is_classifier(self) -> bool:
        return self.get("task") in CLASSIFIER_TASKS

    @property
    def labels(self) -> list[str] | None:
        return self.get("labels")

    @property
    def format_version(self) -> int:
        return int(self.get("format_version", 0))

    @property
    def model(self) -> dict:
        return self.get("model") or {}

    @property
    def max_seq_len(self) -> int:
        return int(self["model"]["max_seq_len"])

    @property
    def vocab_size(self) -> int:
        return int(self["model"]["vocab_size"])

    @property
    def adapter(self) -> dict:
        return self.get("adapter") or {}

    @property
    def trainable(self) -> list[dict]:
        return self["trainable"]

    @property
    def trainable_names(self) -> list[str]:
        """Graph names of the trainable tensors, in the manifest's (and the gradient outputs') order."""
        return [entry["name"] for entry in self["trainable"]]

    @property
    def trainable_shapes(self) -> dict[str, list[int]]:
        """{graph name: shape} of the trainable tensors, in manifest order."""
        return {entry["name"]: list(entry["shape"]) for entry in self["trainable"]}

    @property
    def optimizer(self) -> dict:
        return self.get("optimizer") or {}

    @property
    def quantization(self) -> dict | None:
        return self.get("quantization")

    @property
    def tokenizer(self) -> dict:
        return self.get("tokenizer") or {}

    @property
    def tokenizer_dir(self) -> str:
        return self["tokenizer"]["dir"]

    def tokenizer_path(self, bundle_dir: Path | str) -> Path:
        return Path(bundle_dir) / self.tokenizer_dir

    @property
    def inference(self) -> dict | None:
        return self.get("inference")

    @property
    def source(self) -> dict:
        return self.get("source") or {}

    @property
    def files(self) -> dict[str, dict]:
        return self.get("files") or {}

    @property
    def graph_inputs(self) -> list[dict]:
        return (self.get("graph") or {}).get("inputs", [])

    @property
    def graph_outputs(self) -> list[dict]:
        return (self.get("graph") or {}).get("outputs", [])
