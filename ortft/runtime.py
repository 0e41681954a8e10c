"""The one module that touches onnxruntime's training API, imported without torch.

`import onnxruntime.training.api` runs `onnxruntime/training/__init__.py`, which imports the
`optim` subpackage, which imports torch; on a device without torch that import fails. We register a
bare namespace module for `onnxruntime.training` whose `__path__` is the real folder, so Python
finds `onnxruntime.training.api` (Module, Optimizer, CheckpointState) without running that
`__init__`. With torch installed the real package would also work, but costs ~1.4 s to import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from functools import lru_cache

from .fsutil import native_write_errors
from .memory import drop_mapped_pages, release_freed_memory, reuse_large_blocks


def _register_torch_free_training_package() -> None:
    """Make `onnxruntime.training` a bare namespace package before onnxruntime is first imported.

    `import onnxruntime` itself probes `onnxruntime.training.ortmodule` (in capi/onnxruntime_validation),
    which imports torch wherever torch is installed. Registering the namespace first, and marking
    `ortmodule` (the PyTorch front end we never use) as absent, keeps torch out of the process.
    """
    if "onnxruntime.training" in sys.modules:
        return
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("onnxruntime is not installed: pip install onnxruntime-training-cpu==1.19.2")
    training_dir = os.path.join(list(spec.submodule_search_locations)[0], "training")
    if not os.path.isdir(os.path.join(training_dir, "api")):
        raise ImportError(
            "onnxruntime has no training API: install onnxruntime-training-cpu==1.19.2 "
            "(and not plain onnxruntime, which conflicts with it)"
        )
    namespace = types.ModuleType("onnxruntime.training")
    namespace.__path__ = [training_dir]
    namespace.__package__ = "onnxruntime.training"
    sys.modules["onnxruntime.training"] = namespace
    sys.modules.setdefault("onnxruntime.training.ortmodule", None)  # None: "import fails", as without torch


def onnxruntime_module() -> types.ModuleType:
    """`import onnxruntime`, without letting it import torch. Device code imports ORT only through here."""
    if "onnxruntime" not in sys.modules:
        _register_torch_free_training_package()
    import onnxruntime

    return onnxruntime


@lru_cache(maxsize=1)
def training_api() -> types.ModuleType:
    """Return `onnxruntime.training.api` (Module, Optimizer, CheckpointState), loaded without torch."""
    onnxruntime_module()
    return importlib.import_module("onnxruntime.training.api")


def set_log_level(verbose: bool) -> None:
    """Keep ORT quiet (errors only) unless the user asked for verbose output."""
    ort = onnxruntime_module()
    ort.set_default_logger_severity(0 if verbose and os.environ.get("ORTFT_ORT_VERBOSE") else (2 if verbose else 3))


def session_options(threads: int | None = None, verbose: bool = False):
    """SessionOptions with the thread count and log level ortft uses everywhere."""
    ort = onnxruntime_module()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.log_severity_level = 2 if verbose else 3
    return options


_ENV_ARENA_REGISTERED = False
ARENA_DOUBLING_REGIONS = 0  # OrtArenaCfg arena_extend_strategy: 0 kNextPowerOfTwo, 1 kSameAsRequested


def use_shared_arena(options) -> None:
    """Share one CPU arena between the training and eval sessions; it grows in doubling regions.

    ORT's arena hands out chunks of the regions it has taken from the system and never returns them;
    free neighbours in one region merge, chunks of different regions cannot. Growing by exactly the
    request (kSameAsRequested) gives each new size a region of its own, so batches of changing shapes
    kept adding regions: SmolLM2-135M on the chat data with `--batch-tokens 1024` (a new [rows, length]
    every step) climbed from 2106 MB after the first step to 2884 MB after the eighth (2398 MB at a
    fixed 4 x 256). Doubling regions (kNextPowerOfTwo, ORT's default, capped at 1 GiB per region) are
    few and large, so freed chunks merge: 2336 MB at 4 x 256 and 2162 MB on the chat data, the same step
    time (5 alternating pairs of fresh processes). A region's untouched pages are not resident, so the
    rounding up costs address space, not memory. (This used to be the exact-size arena: with ORT's
    planned buffer reuse on, doubling regions held ~0.8 GB more; `free_tensors_at_last_use` changed that.)
    The allocator is registered once per process.
    """
    global _ENV_ARENA_REGISTERED
    ort = onnxruntime_module()
    if not _ENV_ARENA_REGISTERED:
        memory_info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(memory_info, ort.OrtArenaCfg({"arena_extend_strategy": ARENA_DOUBLING_REGIONS}))
        _ENV_ARENA_REGISTERED = True
    options.add_session_config_entry("session.use_env_allocators", "1")


QUANTIZED_DATA = "quantized_weights.data"  # present in QLoRA bundles (ortft/prepare/artifacts.py)
FROZEN_DATA = "frozen_weights.data"  # the frozen float weights, initializers of both graphs (not in the checkpoint)


def keep_dequantize_separate(options) -> None:
    """Session graph optimisation up to level 1 only, for bundles with quantized frozen weights.

    At level 2 ORT fuses each int4 DequantizeLinear + MatMul of the forward pass into MatMulNBits,
    which repacks the weight into a new initializer (a second copy per session, beside the original the
    backward's DequantizeLinear still reads) and, by default, runs with int8 activations. Measured on a
    random 1.1B Llama, int4 with embeddings, 1 x 128: peak RSS 3.93 -> 3.13 GB, PSS 3.89 -> 2.47 GB, the
    same step time (5.9 s). The training graphs already carry ORT's training fusions (FusedMatMul,
    QuickGelu, SimplifiedLayerNormalization) from artifact generation.
    """
    ort = onnxruntime_module()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def free_tensors_at_last_use(options) -> None:
    """Turn off ORT's planned buffer reuse, so every tensor's memory is freed after its last reader.

    With reuse on, ORT's allocation planner reserves a freed tensor's buffer for a later tensor of the
    same size; in a training graph that later tensor is often in the backward pass, so forward
    temporaries' buffers stay held through the whole forward pass. Measured on SmolLM2-135M, LoRA r=16
    all linear layers, 4 x 256: ORT held 2.1-2.4x the live set that tensor lifetimes give, at every
    optimisation level and execution order; without reuse, peak RSS 4299 -> 2897 MB, step time
    unchanged (5.95 -> 5.78 s). ORTModule turns it off for the same reason (onnxruntime PR #7359).
    """
    options.enable_mem_reuse = False


def without_arena(options) -> None:
    """No CPU memory arena, for bundles with quantized frozen weights: freed tensors go back to the system.

    Both the training and the eval session map quantized_weights.data. With an arena the memory of the
    last training step stays held, so evaluating mapped the file a second time on top of it: random
    1.1B Llama, int4 with embeddings, 1 x 128, peak RSS 3123 MB with the arena, 2419 MB without, the same
    step time (7.7 s over 5 steps either way). Float32 bundles keep the arena (`use_shared_arena`):
    there it saves ~30% of step time on SmolLM2 at 4 x 256.
    """
    options.enable_cpu_mem_arena = False


class TrainingSession:
    """ORT's Module + Optimizer + CheckpointState over one bundle (or a run's checkpoint of it).

    `checkpoint` defaults to the bundle's own; `device` is "cpu" or "cuda[:N]" (ORT's training API
    trains on those only; see ortft/providers.py).
    """

    def __init__(self, bundle_dir, checkpoint=None, device: str = "cpu", threads: int | None = None,
                 verbose: bool = False, with_optimizer: bool = True):
        from pathlib import Path

        api = training_api()
        set_log_level(verbose)
        bundle_dir = Path(bundle_dir)
        self.bundle_dir = bundle_dir
        self.checkpoint_path = Path(checkpoint) if checkpoint is not None else bundle_dir / "checkpoint"
        self.state = api.CheckpointState.load_checkpoint(str(self.checkpoint_path))
        options = session_options(threads, verbose)
        free_tensors_at_last_use(options)
        self.quantized = (bundle_dir / QUANTIZED_DATA).exists()
        if self.quantized:
            keep_dequantize_separate(options)
            without_arena(options)
        elif device == "cpu":
            use_shared_arena(options)
            reuse_large_blocks()
        self.module = api.Module(
            str(bundle_dir / "training_model.onnx"),
            self.state,
            str(bundle_dir / "eval_model.onnx"),
            device=device,
            session_options=options,
        )
        self.optimizer = api.Optimizer(str(bundle_dir / "optimizer_model.onnx"), self.module) if with_optimizer else None
        self._api = api

    @property
    def input_names(self) -> list[str]:
        return list(self.module.input_names())

    @property
    def output_names(self) -> list[str]:
        return list(self.module.output_names())

    def _feed(self, batch: dict):
        return [batch[name] for name in self.input_names]

    def train_step_forward_backward(self, batch: dict):
        """Forward and backward on one micro-batch (gradients accumulate until reset); returns outputs."""
        self.module.train()
        return self.module(*self._feed(batch))

    def optimizer_step(self, learning_rate: float) -> None:
        self.optimizer.set_learning_rate(float(learning_rate))
        self.optimizer.step()
        self.module.lazy_reset_grad()

    def evaluate(self, batch: dict):
        self.module.eval()
        return self.module(*self._feed(batch))

    def release_idle_memory(self) -> None:
        """Call before and after an evaluation pass: gives back freed heap (malloc_trim) and the pages of
        frozen_weights.data and quantized_weights.data either session mapped. Otherwise the eval session's
        pages stay counted on top of the next training step's peak (1.1B int4: ~0.6 GB of RSS; SmolLM2
        float, 6 steps with 3 evaluations: 1953 -> 1380 MB); dropped pages read back from the page cache
        (`ortft/memory.py`)."""
        release_freed_memory()
        for data_file in (QUANTIZED_DATA, FROZEN_DATA):
            if (self.bundle_dir / data_file).exists():
                drop_mapped_pages(self.bundle_dir / data_file)

    def parameter(self, name: str):
        return self.state.parameters[name].data

    def set_parameter(self, name: str, value) -> None:
        self.state.parameters[name] = value

    def parameter_names(self) -> list[str]:
        return [name for name, _parameter in self.state.parameters]

    def trainable_names(self) -> list[str]:
        return [name for name, parameter in self.state.parameters if parameter.requires_grad]

    def save(self, path, include_optimizer_state: bool = True) -> None:
        with native_write_errors():  # a full disk is an OSError, not ORT's RuntimeError
            self._api.CheckpointState.save_checkpoint(self.state, str(path), include_optimizer_state=include_optimizer_state)
