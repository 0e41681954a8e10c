"""`prepare_bundle(config)`: model folder or GGUF -> LoRA training bundle, written atomically.

Stages: resolve and check the source, load it, export the inference template (a KV-cache LM, or the classifier),
inject adapters, export the loss graph, generate ORT artifacts (quantizing frozen weights when asked),
save the tokenizer, write the manifest. Everything goes into a temporary folder that is renamed into place only when complete.
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
import shutil
import sys
import time
from pathlib import Path

import click

from .. import __version__
from ..config import TASKS, PrepareConfig
from ..errors import ConfigError
from ..fsutil import check_output_dir, staged_dir
from ..manifest import BUNDLE_FORMAT, FORMAT_VERSION, write_manifest
from ..memory import release_freed_memory
from ..optimizer import ADAMW_UPDATE
from . import adapters, artifacts, gradient_env, source as sources
from .architectures import architecture_for
from .source_record import recorded_path, recorded_prepare

log = logging.getLogger(__name__)


class StageReporter:
    """Prints `[i/n] stage ... seconds` lines to stderr so the user sees where prepare is."""

    def __init__(self, total: int, quiet: bool = False):
        self.total = total
        self.index = 0
        self.quiet = quiet
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}

    def stage(self, title: str):
        reporter = self

        class _Stage:
            def __enter__(self):
                reporter.index += 1
                self.t0 = time.perf_counter()
                if not reporter.quiet:
                    click.echo(f"[{reporter.index}/{reporter.total}] {title} ...", err=True, nl=False)
                return self

            def __exit__(self, exc_type, exc, tb):
                seconds = time.perf_counter() - self.t0
                reporter.timings[title] = round(seconds, 2)
                if not reporter.quiet:
                    click.echo(f" {'done' if exc_type is None else 'failed'} ({seconds:.1f} s)", err=True)
                return False

        return _Stage()


def _check_task(config: PrepareConfig) -> list[str] | None:
    if config.task not in TASKS:
        raise ConfigError(f"--task {config.task} is unknown", hint=f"choose one of {', '.join(TASKS)}")
    if config.task in ("seq-cls", "token-cls"):
        labels = config.labels
        if labels is None:
            if not config.num_labels or config.num_labels < 2:
                example = "O,B-PER,I-PER,..." if config.task == "token-cls" else "a,b,..."
                raise ConfigError(f"--task {config.task} needs --num-labels N (N >= 2) or --labels {example}")
            labels = [f"LABEL_{i}" for i in range(config.num_labels)]
        if config.num_labels and config.num_labels != len(labels):
            raise ConfigError(f"--num-labels {config.num_labels} disagrees with {len(labels)} names in --labels")
        if len(set(labels)) != len(labels) or len(labels) < 2:
            raise ConfigError("--labels must name at least two distinct classes")
        if config.task == "token-cls" and config.labels is not None:
            check_iob2_labels(labels)
        return labels
    return None


def check_iob2_labels(labels: list[str]) -> None:
    """token-cls label names must be IOB2 tags (O, B-TYPE, I-TYPE): entity metrics and spans rely on them."""
    from ..iob2 import OUTSIDE, entity_type

    wrong = [name for name in labels if name != OUTSIDE and entity_type(name) is None]
    if wrong or OUTSIDE not in labels:
        problem = f"{', '.join(wrong[:3])} {'is not an IOB2 tag' if len(wrong) == 1 else 'are not IOB2 tags'}" if wrong else "there is no O tag"
        raise ConfigError(f"--labels for token-cls: {problem}",
                          hint="name the tags O, B-TYPE and I-TYPE, e.g. --labels O,B-PER,I-PER,B-LOC,I-LOC (or give --num-labels N)")


def _quantization(config: PrepareConfig):
    if config.quantize is None:
        return None
    if config.quantize not in artifacts.QUANTIZE_SCHEMES:
        raise ConfigError(f"--quantize {config.quantize} is unknown", hint=f"choose one of {', '.join(artifacts.QUANTIZE_SCHEMES)}")
    if config.block_size < 2:
        raise ConfigError(f"--block-size must be at least 2, got {config.block_size}")
    return artifacts.Quantization(config)


def _versions() -> dict:
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "ortft": __version__,
        "python": platform.python_version(),
        "onnxruntime": version("onnxruntime"),
        "gradient_builder": gradient_env.TRAINING_BUILD,
        "onnx": version("onnx"),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "peft": version("peft"),
        "optimum": version("optimum"),
    }


def _model_facts(model, config, max_seq_len: int) -> dict:
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None) if generation is not None else None
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    return {
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "num_layers": int(getattr(config, "num_hidden_layers", 0) or 0),
        "hidden_size": hidden,
        "vocab_size": int(config.vocab_size),
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(config, "num_key_value_heads", heads) or heads),
        "head_dim": int(getattr(config, "head_dim", None) or (hidden // heads if heads else 0)),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "max_seq_len": int(min(max_seq_len, getattr(config, "max_position_embeddings", max_seq_len) or max_seq_len)),
        "bos_token_id": getattr(config, "bos_token_id", None),
        "eos_token_ids": eos_ids,
        "pad_token_id": getattr(config, "pad_token_id", None),
    }


def _save_tokenizer(tokenizer, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    for leftover in ("vocab.txt", "merges.txt", "vocab.json", "added_tokens.json", "tokenizer.model"):
        # The device reads tokenizer.json only; slow-tokenizer files would just take space (a tokenizer
        # loaded from a GGUF file even saves the whole GGUF, weights included, as tokenizer.model).
        if (folder / "tokenizer.json").is_file() and (folder / leftover).exists():
            (folder / leftover).unlink()
    if (folder / "tokenizer.json").is_file():
        _compact_tokenizer_json(folder / "tokenizer.json")
    template = getattr(tokenizer, "chat_template", None)
    template_file = folder / "chat_template.jinja"
    if isinstance(template, str) and template and not template_file.exists():
        template_file.write_text(template, encoding="utf-8")
    return {
        "dir": "tokenizer",
        "chat_template": "tokenizer/chat_template.jinja" if template_file.exists() else None,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "add_bos_token": bool(getattr(tokenizer, "add_bos_token", False)),
    }


def _compact_tokenizer_json(path: Path) -> None:
    """Rewrite tokenizer.json without the indentation transformers saves it with: the same tokenizer, as the
    tokenizers library serializes it (SmolLM2's: 3.5 -> 1.6 MB)."""
    from tokenizers import Tokenizer

    from ..fsutil import write_bytes_atomic

    write_bytes_atomic(path, Tokenizer.from_file(str(path)).to_str(pretty=False).encode("utf-8"))


def _graph_io(model) -> dict:
    from onnx import TensorProto

    def describe(value):
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        return {"name": value.name, "dtype": TensorProto.DataType.Name(tensor.elem_type).lower(), "shape": dims}

    return {"inputs": [describe(v) for v in model.graph.input], "outputs": [describe(v) for v in model.graph.output]}


def prepare_bundle(config: PrepareConfig, quiet: bool = False) -> dict:
    """Build the bundle described by `config` at `config.out`; returns the manifest."""
    import onnxruntime
    import transformers

    onnxruntime.set_default_logger_severity(0 if config.verbose else 3)
    if not config.verbose:
        transformers.utils.logging.set_verbosity_error()  # e.g. the GGUF tokenizer's "legacy behaviour" notice
    labels = _check_task(config)
    quantization = _quantization(config)
    out = Path(config.out)
    check_output_dir(out, config.force)
    source = sources.resolve_source(config.model, config.gguf_file)
    if config.adapter is None:
        adapters.check_settings(config)
    causal = config.task == "causal-lm"
    reporter = StageReporter(total=8, quiet=quiet)

    with reporter.stage("reading the model config"):
        hf_config = sources.load_config(source)
        arch = architecture_for(hf_config.model_type, config.task, source.display)
        if labels:
            hf_config.id2label = dict(enumerate(labels))
            hf_config.label2id = {name: i for i, name in enumerate(labels)}
    with reporter.stage(f"loading {source.display}"):
        model = sources.load_model(source, hf_config, config.task, len(labels) if labels else None, config.seed,
                                   quiet=quiet)
        tokenizer = sources.load_tokenizer(source)
        weights_sha256 = source.weights_sha256()

    with staged_dir(out, force=config.force) as stage_dir:
        work_dir = stage_dir / ".work"
        work_dir.mkdir()
        inference_section = None
        if causal and config.inference_template:
            with reporter.stage("exporting the inference template (KV cache)"):
                from .inference import export_inference_template

                inference_section = export_inference_template(model, stage_dir / "inference", opset=config.opset)
        elif config.inference_template:
            with reporter.stage("exporting the inference template (classifier)"):
                from .classifier_inference import export_classifier_template

                inference_section = export_classifier_template(model, config.task, arch.classifier_modules,
                                                               stage_dir / "inference", opset=config.opset)
        with reporter.stage("injecting adapters"):
            peft_model = adapters.inject(model, config, arch, config.task)
            trainable = adapters.describe_trainable(peft_model)
            adapter_section = adapters.adapter_settings(peft_model, config)
        with reporter.stage("exporting the training graph"):
            from .onnx_export import export_training_graph

            loss_model, attention_functions_replaced = export_training_graph(
                peft_model, config.task, int(hf_config.vocab_size), work_dir / "export.onnx", config.opset, config.verbose,
                attention_placeholders=config.attention_chunk_rows > 0,
            )
            graph_io = _graph_io(loss_model)
        with reporter.stage("saving the tokenizer"):
            tokenizer_section = _save_tokenizer(tokenizer, stage_dir / "tokenizer")
            from .gguf_tokenizer import tokenizer_source_facts  # where the special tokens came from (issue 19)

            tokenizer_section["source_facts"] = tokenizer_source_facts(source, tokenizer)
        facts = _model_facts(model, hf_config, config.max_seq_len)
        if facts["pad_token_id"] is None and tokenizer.pad_token_id is not None:
            facts["pad_token_id"] = tokenizer.pad_token_id
        num_trainable = int(sum(p.numel() for p in peft_model.parameters() if p.requires_grad))
        num_total = int(sum(p.numel() for p in peft_model.parameters()))
        # The torch model is no longer needed: free it before ORT builds the gradient graph (peak RSS).
        del peft_model, model
        release_freed_memory()
        with reporter.stage("building the training graph (gradients, standard ONNX)"):
            trainable_names = sorted(entry["name"] for entry in trainable)
            loss_graph = artifacts.save_loss_graph(loss_model, trainable_names, work_dir, config.external_data, quantization,
                                                   loss_chunks=config.loss_chunks if causal else 0,
                                                   loss_chunk_rows=config.resolved_loss_chunk_rows())
            frozen = loss_graph.frozen
            del loss_model  # ORT reads the saved graph: the proto's memory is freed first (peak RSS)
            release_freed_memory()
            graphs = artifacts.generate(loss_graph, stage_dir, config.verbose,
                                        recompute_activations=config.recompute_activations,
                                        attention_chunk_rows=config.attention_chunk_rows)
            initial_adapter_zeros = graphs["initial_adapter_zeros"]
            from .prefix_graphs import write_prefix_cache_graphs  # the frozen-prefix cache's graphs (issue 26)

            prefix_cache_section = write_prefix_cache_graphs(stage_dir, config.task, adapter_section["layers"],
                                                             facts["hidden_size"], trainable)
            if causal and inference_section is not None:  # one copy of each weight: the template reads the graphs' files
                from .shared_weights import share_template_weights

                inference_section = share_template_weights(stage_dir, inference_section, trainable)
        with reporter.stage("writing the manifest"):
            shutil.rmtree(work_dir)
            manifest = {
                "format": BUNDLE_FORMAT,
                "format_version": FORMAT_VERSION,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "versions": _versions(),
                "source": {
                    "path": recorded_path(source.folder, config.record_source_path),  # a name unless --record-source-path
                    "gguf_file": source.gguf_file,
                    "architecture": facts["architecture"],
                    "model_type": facts["model_type"],
                    "weights_sha256": weights_sha256,
                },
                "task": config.task,
                "labels": labels,
                "model": facts,
                "adapter": adapter_section,
                "optimizer": {
                    "name": "adamw",
                    "weight_decay": config.weight_decay,
                    "max_grad_norm": config.max_grad_norm,
                    "betas": [0.9, 0.999],
                    "eps": 1e-6,
                    "update": ADAMW_UPDATE,  # the update ortft/optimizer.py makes on the device
                },
                "trainable": trainable,
                "initial_adapter_zeros": initial_adapter_zeros,  # left out of initial_adapter.safetensors
                "frozen": frozen,
                "frozen_weights": graphs["frozen_weights"],
                "num_trainable_parameters": num_trainable,
                "num_frozen_parameters": num_total - num_trainable,
                "graph": graph_io,
                "graph_patches": {"attention_functions_replaced": attention_functions_replaced, **graphs["graph_patches"]},
                "passes": graphs["passes"],  # {stage: {pass: count}} (ortft/prepare/graph_stages.py)
                "quantization": graphs.get("quantization"),
                "prefix_cache": prefix_cache_section,
                "tokenizer": tokenizer_section,
                "inference": inference_section,
                "prepare": {**recorded_prepare(config, sys.argv), "timings_s": reporter.timings},
            }
            manifest = write_manifest(stage_dir, manifest)
    if not quiet:
        click.echo(
            f"bundle ready: {out}  ({num_trainable:,} trainable of {num_total:,} parameters, "
            f"{100.0 * num_trainable / max(num_total, 1):.2f}%; {time.perf_counter() - reporter.started:.1f} s)",
            err=True,
        )
    return manifest
