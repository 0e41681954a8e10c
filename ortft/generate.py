"""Text generation on the device: numpy sampling over an onnxruntime InferenceSession with a KV cache.

`Generator(export_dir)` loads a merged export, an onnx-adapter export with one of its adapters active, or a
bundle's base inference model; `stream_ids` yields token ids.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .bundle import CLASSIFIER_TASKS, TOKENIZER_DIR
from .config import LATEST_CHECKPOINT, SamplingSettings  # noqa: F401  (defaults live in ortft.config)
from .errors import BundleError, ConfigError

logger = logging.getLogger(__name__)

MAX_CHARS_PER_TOKEN = 64  # a prompt longer than this many characters per token of context cannot fit it
ONNX_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass
class GenerationStats:
    """What the last generation cost: tokens in, tokens out, seconds, speed."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stopped_by: str = ""

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: new tokens after the first, per second of decoding."""
        decoded = max(self.new_tokens - 1, 0)
        return decoded / self.decode_s if self.decode_s > 0 and decoded else 0.0

    def summary(self) -> str:
        return (
            f"{self.prompt_tokens} prompt tokens in {self.prefill_s:.2f} s, {self.new_tokens} new tokens "
            f"at {self.tokens_per_s:.1f} tokens/s (stopped by {self.stopped_by})"
        )


# ---- sampling (pure numpy) -------------------------------------------------------------------------


def apply_repetition_penalty(logits: np.ndarray, seen_ids: Sequence[int], penalty: float) -> np.ndarray:
    """Hugging Face's rule: a seen token's positive logit is divided by `penalty`, a negative one multiplied."""
    if penalty == 1.0 or not len(seen_ids):
        return logits
    logits = logits.copy()
    seen = np.unique(np.asarray(seen_ids, dtype=np.int64))
    values = logits[seen]
    logits[seen] = np.where(values > 0, values / penalty, values * penalty)
    return logits


def filter_top_k(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Keep the `top_k` largest logits (ties with the k-th kept), set the rest to -inf; 0 keeps all."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    threshold = np.partition(logits, -top_k)[-top_k]
    return np.where(logits < threshold, -np.inf, logits)


def filter_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches `top_p`."""
    if top_p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits[order])
    cumulative = np.cumsum(probs)
    keep_sorted = cumulative - probs < top_p  # a token is kept if the mass before it is below top_p
    keep_sorted[0] = True
    keep = np.zeros_like(keep_sorted)
    keep[order] = keep_sorted
    return np.where(keep, logits, -np.inf)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - np.max(logits))
    return shifted / shifted.sum()


def next_token(logits: np.ndarray, seen_ids: Sequence[int], settings: SamplingSettings, rng: np.random.Generator) -> int:
    """Pick one token id from a [vocab] logits row: greedy at temperature 0, else sample."""
    logits = apply_repetition_penalty(logits.astype(np.float64), seen_ids, settings.repetition_penalty)
    if settings.temperature <= 0:
        return int(np.argmax(logits))
    logits = logits / settings.temperature
    logits = filter_top_p(filter_top_k(logits, settings.top_k), settings.top_p)
    return int(rng.choice(logits.shape[-1], p=softmax(logits)))


# ---- the model --------------------------------------------------------------------------------------


@dataclass
class ModelFolder:
    """Where the ONNX model, tokenizer and special token ids of a generate-able folder are."""

    model_path: Path
    tokenizer_dir: Path
    eos_token_ids: list[int] = field(default_factory=list)
    session_config: dict[str, str] = field(default_factory=dict)  # ORT session config entries the model needs
    folder: Path | None = None  # the folder holding the manifest
    adapter_path: Path | None = None  # an onnx-adapter export's chosen .onnx_adapter file
    adapter_names: list[str] = field(default_factory=list)  # every adapter an onnx-adapter export holds
    context_length: int | None = None  # prompt + new tokens never exceed this (ortft.trust.context_length)


def describe_model_folder(folder: Path | str, adapter: str | None = None) -> ModelFolder:
    """An export made by `ortft export --format merged-onnx` or `onnx-adapter` (`adapter` picks one of its
    adapters; none runs the base model), or a bundle (its base inference model)."""
    from .trust import context_length, open_model_folder

    folder = Path(folder)
    manifest = open_model_folder(folder)  # the loader gate: hashes, links, the graphs' external data
    if manifest.get("task") in CLASSIFIER_TASKS:
        raise ConfigError(f"{folder} holds a {manifest['task']} classifier, which labels text rather than writing it",
                          hint="label text with `ortft predict RUN_OR_EXPORT --data FILE.jsonl` (a run folder or its merged-onnx export)")
    eos_ids = list((manifest.get("model") or {}).get("eos_token_ids") or [])
    described = _describe(folder, manifest, eos_ids, adapter)
    described.context_length = context_length(folder, manifest)
    return described


def _describe(folder: Path, manifest: dict, eos_ids: list[int], adapter: str | None) -> ModelFolder:
    kind = manifest.get("kind")
    if manifest.get("format") == "ortft-export" and kind in ("merged-onnx", "onnx-adapter"):
        config = dict(manifest.get("session_config") or {})  # what the export's graph needs (recorded by export)
        if (manifest.get("quantization") or {}).get("scheme") == "int8":
            # int8 weights are DequantizeLinear -> MatMul; ORT has no fused CPU kernel for them and by default
            # re-runs the DequantizeLinear every forward (~18x slower on SmolLM2). This lets its constant
            # folding dequantize them once at load: float32 speed (and float32 memory), small files on disk.
            config["session.disable_quant_qdq"] = "1"
        described = ModelFolder(folder / "model.onnx", _tokenizer_dir(folder, manifest), eos_ids, config, folder)
        if kind == "onnx-adapter":
            described.adapter_names = sorted(manifest.get("adapters") or {})
            if adapter is not None:
                described.adapter_path = _adapter_file(folder, manifest, adapter)
        elif adapter is not None:
            raise ConfigError(f"--adapter {adapter}: {folder} is a merged export, its adapter is folded in",
                              hint="drop --adapter, or pass a folder made by `ortft export --format onnx-adapter`")
        return described
    if adapter is not None:
        raise ConfigError(f"--adapter {adapter}: {folder} holds no adapters to choose from",
                          hint="pass a folder made by `ortft export --format onnx-adapter`")
    if manifest.get("format") == "ortft-bundle" and manifest.get("inference"):
        from .inference_template import template_session_config

        return ModelFolder(folder / manifest["inference"]["model"], folder / TOKENIZER_DIR, eos_ids, template_session_config(manifest), folder)
    raise BundleError(
        f"{folder} holds no ONNX model to generate with (format {manifest.get('format')}, kind {kind})",
        hint="export with --format merged-onnx or onnx-adapter, or pass the run folder itself",
    )


def _tokenizer_dir(folder: Path, manifest: dict) -> Path:
    """An export's tokenizer: at its root (exports since format version 2) or in tokenizer/ (earlier ones)."""
    recorded = (manifest.get("tokenizer") or {}).get("dir")
    if recorded and (folder / recorded / "tokenizer.json").is_file():
        return folder / recorded
    return folder if (folder / "tokenizer.json").is_file() else folder / TOKENIZER_DIR


def _adapter_file(folder: Path, manifest: dict, name: str) -> Path:
    adapters = manifest.get("adapters") or {}
    if name not in adapters:
        listed = ", ".join(sorted(adapters)) or "none"
        raise ConfigError(f"--adapter {name}: {folder} has no adapter of that name (it has: {listed})",
                          hint=f"export a run into it with `ortft export RUN --format onnx-adapter --out {folder} --adapter-name {name}`")
    from .trust import member_path

    return member_path(folder, adapters[name]["file"], BundleError, "export")


def inference_session(model_path: Path, provider="cpu", threads: int | None = None, verbose: bool = False,
                      session_config: dict[str, str] | None = None):
    """An InferenceSession on the requested provider; one missing from this build falls back to CPU (logged)."""
    from .providers import resolve_for_inference
    from .runtime import onnxruntime_module, session_options
    from .threads import default_threads

    ort = onnxruntime_module()
    providers = resolve_for_inference(provider)
    options = session_options(threads or default_threads(), verbose)
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, value)
    try:
        return ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
    except Exception as exc:  # an accelerator that fails to initialise: CPU still works
        if providers[0][0] == "CPUExecutionProvider":
            raise
        logger.warning("execution provider %s failed (%s); running on CPU instead", providers[0][0], str(exc).splitlines()[0])
        return ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])


def load_onnx_adapter(path: Path):
    """An `.onnx_adapter` file loaded as onnxruntime's LoraAdapter (its tensors feed the graph's adapter inputs)."""
    from .runtime import onnxruntime_module

    ort = onnxruntime_module()
    if not hasattr(ort, "LoraAdapter"):
        raise ConfigError(f"serving {path.name} needs onnxruntime >= 1.20 (this is {ort.__version__})",
                          hint="install ortft's own onnxruntime (`pip install .`), or use a merged-onnx export")
    adapter = ort.LoraAdapter()
    try:
        adapter.Load(str(path))
    except Exception as exc:  # onnxruntime raises its own exception types for a damaged file
        raise BundleError(f"{path} is not a readable .onnx_adapter file ({str(exc).splitlines()[0]})",
                          hint="export that run into the folder again") from exc
    return adapter


def adapter_run_options(adapter):
    """RunOptions that make `adapter` active for every run of a session."""
    from .runtime import onnxruntime_module

    options = onnxruntime_module().RunOptions()
    options.add_active_adapter(adapter)
    return options


class KVCacheModel:
    """One causal LM session: feeds input ids with position ids and the past key/values, keeps the presents."""

    def __init__(self, session, run_options=None):
        self.session = session
        self.run_options = run_options  # e.g. an active LoRA adapter (an onnx-adapter export's)
        inputs = {value.name: value for value in session.get_inputs()}
        self.past_names = [name for name in inputs if name.startswith("past_key_values.")]
        self.present_names = ["present." + name.removeprefix("past_key_values.") for name in self.past_names]
        first_past = inputs[self.past_names[0]] if self.past_names else None
        self.cache_dtype = ONNX_TO_NUMPY.get(first_past.type, np.float32) if first_past else np.float32
        self.kv_heads, self.head_dim = (first_past.shape[1], first_past.shape[3]) if first_past else (0, 0)
        self.takes_position_ids = "position_ids" in inputs
        self.reset()

    def reset(self) -> None:
        self.past = {name: np.zeros((1, self.kv_heads, 0, self.head_dim), self.cache_dtype) for name in self.past_names}
        self.length = 0

    def forward(self, new_ids: Sequence[int]) -> np.ndarray:
        """Run `new_ids` after what is cached; return the logits of the last position, [vocab]."""
        count = len(new_ids)
        feeds = {
            "input_ids": np.asarray([new_ids], dtype=np.int64),
            "attention_mask": np.ones((1, self.length + count), dtype=np.int64),
            **self.past,
        }
        if self.takes_position_ids:
            feeds["position_ids"] = np.arange(self.length, self.length + count, dtype=np.int64)[None, :]
        outputs = self.session.run(["logits", *self.present_names], feeds, self.run_options)
        self.past = dict(zip(self.past_names, outputs[1:]))
        self.length += count
        return outputs[0][0, -1]


class Generator:
    """Loads a model folder once; generates token ids or text, streaming, with stats of the last run."""

    def __init__(self, folder: Path | str, provider="cpu", threads: int | None = None, verbose: bool = False,
                 adapter: str | None = None):
        self.folder = describe_model_folder(folder, adapter)
        session = inference_session(self.folder.model_path, provider, threads, verbose, self.folder.session_config)
        self.adapter = load_onnx_adapter(self.folder.adapter_path) if self.folder.adapter_path else None
        self.model = KVCacheModel(session, adapter_run_options(self.adapter) if self.adapter is not None else None)
        self._tokenizer = None
        self.stats = GenerationStats()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.folder.tokenizer_dir)
        return self._tokenizer

    def eos_token_ids(self) -> set[int]:
        ids = set(self.folder.eos_token_ids)
        if self.folder.tokenizer_dir.is_dir():
            ids |= set(self.tokenizer.eos_token_ids)
        return ids

    def stream_ids(self, prompt_ids: Sequence[int], settings: SamplingSettings = SamplingSettings()) -> Iterator[int]:
        """Yield new token ids one at a time; stop at an eos token (not yielded) or after max_new_tokens."""
        if not len(prompt_ids):
            raise ValueError("the prompt has no tokens")
        context = self.folder.context_length
        if context is not None and len(prompt_ids) > context:
            raise ConfigError(f"the prompt has {len(prompt_ids)} tokens, more than the model's context of {context}",
                              hint="shorten the prompt (or the chat so far)")
        max_new_tokens = settings.max_new_tokens if context is None else min(settings.max_new_tokens, context - len(prompt_ids))
        rng = np.random.default_rng(settings.seed)
        eos_ids = self.eos_token_ids()
        seen = list(prompt_ids)
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids),
                                     stopped_by="max_new_tokens" if max_new_tokens == settings.max_new_tokens else "context")
        self.model.reset()
        started = time.perf_counter()
        logits = self.model.forward(list(prompt_ids))
        self.stats.prefill_s = time.perf_counter() - started
        decode_started = time.perf_counter()
        for step in range(max_new_tokens):
            token = next_token(logits, seen, settings, rng)
            if token in eos_ids:
                self.stats.stopped_by = "eos"
                break
            self.stats.new_tokens += 1
            self.stats.decode_s = time.perf_counter() - decode_started
            yield token
            seen.append(token)
            if step + 1 < max_new_tokens:
                logits = self.model.forward([token])
        self.stats.decode_s = time.perf_counter() - decode_started

    def generate_ids(self, prompt_ids: Sequence[int], settings: SamplingSettings = SamplingSettings()) -> list[int]:
        return list(self.stream_ids(prompt_ids, settings))

    def stream_text(self, prompt: str, settings: SamplingSettings = SamplingSettings(), add_special_tokens: bool = True) -> Iterator[str]:
        """Yield pieces of generated text as they become printable (no split UTF-8 characters)."""
        context = self.folder.context_length
        if context is not None and len(prompt) > context * MAX_CHARS_PER_TOKEN:  # refused before tokenizing it
            raise ConfigError(f"the prompt has {len(prompt)} characters, far more than the model's context of {context} tokens holds",
                              hint="shorten the prompt (or the chat so far)")
        prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        yield from self._decode_stream(self.stream_ids(prompt_ids, settings))

    def stream_chat(self, messages: list[dict], settings: SamplingSettings = SamplingSettings()) -> Iterator[str]:
        """Render `messages` with the chat template (generation prompt on) and stream the reply."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        yield from self.stream_text(prompt, settings, add_special_tokens=False)

    def _decode_stream(self, token_ids: Iterator[int]) -> Iterator[str]:
        generated: list[int] = []
        printed = ""
        for token in token_ids:
            generated.append(token)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue  # half of a multi-byte character: wait for the rest
            if text.startswith(printed):
                yield text[len(printed):]
                printed = text
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        if text.startswith(printed) and len(text) > len(printed):
            yield text[len(printed):]


def open_generator(path: Path | str, checkpoint: str = LATEST_CHECKPOINT, provider="cpu", threads: int | None = None, verbose: bool = False,
                   adapter: str | None = None) -> Generator:
    """A Generator for an export folder, a bundle, or a run folder (merged into a temporary folder first).

    `adapter` names the adapter of an onnx-adapter export to serve.
    """
    import tempfile

    path = Path(path)
    if not (path / "run.json").is_file():
        return Generator(path, provider, threads, verbose, adapter)
    if adapter is not None:
        raise ConfigError(f"--adapter {adapter}: {path} is a run folder, whose adapter is its own",
                          hint="drop --adapter, or pass a folder made by `ortft export --format onnx-adapter`")
    from .export import export_run

    temp_dir = tempfile.TemporaryDirectory(prefix="ortft-generate-")
    merged_dir = Path(temp_dir.name) / "merged"
    export_run(path, merged_dir, checkpoint=checkpoint, kind="merged-onnx")
    generator = Generator(merged_dir, provider, threads, verbose)
    generator.tokenizer  # load now: the temporary folder goes away with the generator
    generator.temp_dir = temp_dir
    return generator
