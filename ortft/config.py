"""Dataclasses that are the single source of defaults for every command's settings.

The CLI builds one of these from its options (and, for training, a YAML file); the library
functions take them. Defaults live here and nowhere else: each command's click options take their
defaults from its dataclass (tests/test_config.py checks every command), and the library functions'
keyword defaults name the constants below.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

TASKS = ("causal-lm", "seq-cls", "token-cls")
DEFAULT_SEQ_LEN = 512  # tokens per training or evaluation row unless --seq-len says otherwise
DEFAULT_LR = 2e-4  # peak learning rate of the adapters (train, the federated nodes, prepare's recorded hint)
INT4_BLOCK_SIZE = 32  # int4 weights per scale block along a layer's input dimension (prepare and export)
LATEST_CHECKPOINT = "latest"  # --checkpoint: the newest intact checkpoint of a run
BEST_CHECKPOINT = "best"  # --checkpoint: the checkpoint with the lowest validation loss
FEDERATED_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "trimmed-mean", "krum")
# Fewest rows per loss slice of a float32 bundle. Quantized bundles keep even slices (1): there memory
# comes first (SmolLM2 int4 at 1 x 128: 700 MB peak RSS with even slices, 822 MB with 256-row ones, 10% faster).
FLOAT_LOSS_CHUNK_ROWS = 256
# Query rows per chunk of the training graph's causal attention (ortft/graph/blocked_attention.py): each
# chunk's [heads, rows, keys] scores exist only while it runs; 0 keeps the full [seq, seq] attention.
ATTENTION_CHUNK_ROWS = 256


@dataclass
class PrepareConfig:
    """Settings of `ortft prepare`: which model, which adapters, which optimizer."""

    model: str = ""
    out: str = ""
    gguf_file: str | None = None
    task: str = "causal-lm"
    num_labels: int | None = None
    labels: list[str] | None = None
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str = "all-linear"
    layers: int | None = None
    dora: bool = False
    rslora: bool = False
    adapter: str | None = None
    adapter_overrides: dict = field(default_factory=dict)  # settings given explicitly beside --adapter
    max_seq_len: int = 2048
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    learning_rate_hint: float = DEFAULT_LR
    opset: int = 17
    quantize: str | None = None  # None (float32), "int8" or "int4": store frozen base weights quantized (QLoRA-style)
    block_size: int = INT4_BLOCK_SIZE  # int4: values per scale block along each weight's input dimension
    quantize_symmetric: bool = True  # int4: symmetric (no zero point) or asymmetric (uint4 zero point per block)
    quantize_all_linear: bool = False  # quantize every frozen linear layer, not only the adapted ones
    quantize_embeddings: bool = False  # quantize the embedding table and the LM head too
    quantize_recompute: bool = True  # the backward pass dequantizes again rather than keeping the forward copy
    recompute_activations: bool = True  # the backward recomputes cheap activations (SwiGLU) and normed inputs instead of keeping them
    loss_chunks: int = 8  # causal LM: cross-entropy as a log-sum-exp in this many row slices; 0: ORT's fused op
    # ... but no slice smaller than this many rows (fewer, larger LM-head products on short batches);
    # None: FLOAT_LOSS_CHUNK_ROWS, or 1 (even slices, the least memory) for quantized bundles
    loss_chunk_rows: int | None = None
    attention_chunk_rows: int = ATTENTION_CHUNK_ROWS  # causal attention in query chunks (0: full scores)
    seed: int = 0
    external_data: bool | None = None  # None: only when the graph would pass ONNX's 2 GB limit
    inference_template: bool = True
    record_source_path: bool = False  # the manifest keeps the source model's and adapter's paths as given (else their names)
    force: bool = False
    verbose: bool = False

    def resolved_loss_chunk_rows(self) -> int:
        """loss_chunk_rows as the graph gets it (None: the default for float32 or quantized bundles)."""
        if self.loss_chunk_rows is not None:
            return self.loss_chunk_rows
        return 1 if self.quantize else FLOAT_LOSS_CHUNK_ROWS

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig:
    """Settings of `ortft train`; `ortft train --config run.yaml` holds the same keys."""

    bundle: str = ""
    data: str = ""
    out: str = ""
    valid: str | None = None
    valid_fraction: float | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = DEFAULT_SEQ_LEN
    lr: float = DEFAULT_LR
    schedule: str = "cosine"
    warmup: int = 10
    mask_prompt: bool | None = None  # None: on for prompt/completion and chat data
    pack: bool = False
    batch_tokens: int | None = None  # length-grouped batches of up to this many tokens instead of batch_size rows
    eval_every: int = 50
    save_every: int = 50
    keep: int = 3
    resume: bool = False
    seed: int = 0
    threads: int | None = None
    provider: str = "auto"  # the best execution provider installed (ortft/providers.py AUTO_ORDER)
    max_eval_batches: int | None = None
    init_adapter: str | None = None  # start from these adapter weights (safetensors, graph names)
    max_example_chars: int | None = None  # data: characters an example keeps before tokenizing (None: 64 x seq_len)
    prefix_cache: bool = True  # bundles with a frozen prefix: compute its output once per row (ortft/prefix_cache.py)
    prefix_cache_mb: float | None = None  # its memory budget before it spills to the run folder (None: 1/4 of free memory)
    verbose: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """Refuse settings no bundle could train with (ConfigError naming the flag); the one place they are checked.
        What depends on the bundle (--seq-len against its max_seq_len) is checked when the bundle is open."""
        from .errors import ConfigError

        if not self.data:
            raise ConfigError("no training data: give --data train.jsonl (or data: in --config)")
        if not self.out:
            raise ConfigError("no run folder: give --out RUN_DIR (or out: in --config)")
        for name in ("batch_size", "grad_accum", "seq_len", "eval_every", "save_every", "keep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {value} must be a whole number of at least 1")
        if not self.lr > 0:
            raise ConfigError(f"--lr {self.lr} must be positive")
        if self.warmup < 0:
            raise ConfigError(f"--warmup {self.warmup} must not be negative")
        if self.valid is not None and self.valid_fraction is not None:
            raise ConfigError("give --valid or --valid-fraction, not both")
        if self.valid_fraction is not None and not 0.0 < self.valid_fraction < 1.0:
            raise ConfigError(f"--valid-fraction {self.valid_fraction} must lie between 0 and 1")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps {self.steps} must be at least 1")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"--epochs {self.epochs} must be positive")


@dataclass
class EvalConfig:
    """Settings of `ortft eval`: a bundle or a run's checkpoint on JSONL data."""

    bundle_or_run: str = ""
    data: str = ""
    batch_size: int = 4
    seq_len: int | None = None  # None: the run's own setting, DEFAULT_SEQ_LEN for a bundle
    max_example_chars: int | None = None
    checkpoint: str = LATEST_CHECKPOINT
    mask_prompt: bool | None = None
    threads: int | None = None
    max_batches: int | None = None


@dataclass
class ExportConfig:
    """Settings of `ortft export`: which checkpoint of a run, in which format, where."""

    run_dir: str = ""
    out_dir: str = ""
    checkpoint: str = LATEST_CHECKPOINT
    format: str = "merged-onnx"
    quantize: str | None = None
    block_size: int | None = None  # int4: None means INT4_BLOCK_SIZE
    adapter_name: str | None = None
    gguf_type: str | None = None
    force: bool = False


@dataclass
class GenerateConfig:
    """Settings of `ortft generate` besides the sampling (SamplingSettings)."""

    model_dir: str = ""
    prompt: str | None = None
    chat: bool = False
    checkpoint: str = LATEST_CHECKPOINT
    adapter: str | None = None
    provider: str = "cpu"
    threads: int | None = None
    verbose: bool = False


@dataclass
class PredictConfig:
    """Settings of `ortft predict`: labels or entities from a seq-cls or token-cls run or export."""

    model_dir: str = ""
    data: str = ""
    out_file: str | None = None
    force: bool = False
    checkpoint: str = LATEST_CHECKPOINT
    batch_size: int = 8
    seq_len: int | None = None  # None: the model's max_seq_len
    provider: str = "cpu"
    threads: int | None = None
    verbose: bool = False


@dataclass
class FederationConfig:
    """Settings of a federation: the ServerApp's run configuration (keys with dashes, `flwr run --run-config`),
    `ortft federate local`'s options and the nodes' local training settings."""

    bundle: str = ""
    out: str = ""
    rounds: int = 3
    strategy: str = "fedavg"
    local_steps: int = 20
    lr: float = DEFAULT_LR
    batch_size: int = 4
    seq_len: int = DEFAULT_SEQ_LEN
    schedule: str = "constant"
    warmup: int = 0
    seed: int = 0
    min_nodes: int = 2
    fraction_train: float = 1.0
    round_timeout: float = 3600.0  # seconds; long enough for a slow device's round, a dead node is noticed sooner
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    trim_beta: float = 0.2
    krum_malicious_nodes: int = 0
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    max_update_norm: float = 0.0
    max_examples: int = 10_000_000
    resume: bool = False
    keep: int = 3

    @classmethod
    def run_config_defaults(cls) -> dict:
        """The defaults as a Flower run configuration: run-config key (dashes) -> value."""
        return {name.replace("_", "-"): value for name, value in asdict(cls()).items()}

    def to_dict(self) -> dict:
        return asdict(self)


def default_of(config_class: type, name: str):
    """The default of field `name` of a config dataclass (what a click option shows and uses)."""
    for item in fields(config_class):
        if item.name == name:
            if item.default is not MISSING:
                return item.default
            if item.default_factory is not MISSING:
                return item.default_factory()
            break
    raise KeyError(f"{config_class.__name__} has no field {name!r} with a default")


def as_path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


@dataclass
class SamplingSettings:
    """How `ortft generate` picks the next token; temperature 0 is greedy (argmax)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0


@dataclass
class InputLimits:
    """What input from elsewhere (data files, chat templates, prompts) may cost before ortft cuts or refuses it
    (docs/security.md). The data caps scale with --seq-len; `--max-example-chars` raises them."""

    template_seconds: float = 5.0  # one render of a chat template; a longer one is stopped (TemplateError)
    template_chars: int = 4_000_000  # the text one render may make; at least 2 x the example cap (ChatTemplate)
    chars_per_token: int = 64  # an example is cut at --seq-len x this many characters before it is tokenized
    line_bytes_per_char: int = 6  # a JSONL line may hold 6 bytes per allowed character (a \uXXXX escape) ...
    line_bytes_extra: int = 1 << 16  # ... plus 64 KiB (keys, other fields)

    def example_chars(self, seq_len: int, max_example_chars: int | None = None) -> int:
        """The characters an example keeps before tokenizing: `max_example_chars`, or seq_len x chars_per_token."""
        return int(max_example_chars) if max_example_chars else int(seq_len) * self.chars_per_token

    def line_bytes(self, example_chars: int) -> int:
        """The longest JSONL line read for an example cap of `example_chars` characters."""
        return example_chars * self.line_bytes_per_char + self.line_bytes_extra
