"""The one place that creates onnxruntime sessions: the training step, evaluation and their settings.

ortft trains on stock onnxruntime. The bundle's training graph is standard ONNX (prepare lowered
every training-only op, ortft/graph/lower_training_ops.py): its inputs are the batch and the trainable
tensors, its outputs the loss and one `NAME_grad` per trainable tensor. `TrainingSession` runs it
as a plain InferenceSession with the parameters and gradients bound as OrtValues over numpy buffers
(no per-step copies), sums gradients over micro-batches and makes the optimizer step itself
(ortft/optimizer.py: PyTorch's AdamW). Evaluation runs the eval graph with the same parameter buffers.
The frozen weights are initializers in frozen_weights.data (and quantized_weights.data), which both
sessions map.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .bundle import EVAL_GRAPH, FROZEN_DATA, QUANTIZED_DATA, TRAINING_GRAPH, BundleManifest
from .memory import drop_mapped_pages, release_freed_memory, reuse_large_blocks

log = logging.getLogger(__name__)

GRAD_SUFFIX = "_grad"  # the training graph's output for trainable tensor NAME is NAME_grad


def onnxruntime_module():
    """`import onnxruntime`: device code imports ORT only through here (one place to change)."""
    import onnxruntime

    return onnxruntime


def onnxruntime_distribution() -> tuple[str, str] | None:
    """(package name, version) of the installed distribution that provides the module `onnxruntime`."""
    import importlib.metadata as metadata

    for name in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml", "onnxruntime-qnn",
                 "onnxruntime-training-cpu", "onnxruntime-training", "onnxruntime-rocm", "onnxruntime-cann"):
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


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
    kept adding regions (SmolLM2-135M, chat data, `--batch-tokens 1024`: 2106 -> 2884 MB over eight
    steps). Doubling regions (kNextPowerOfTwo, capped at 1 GiB per region) are few and large, so freed
    chunks merge (2162 MB, the same step time). A region's untouched pages are not resident, so the
    rounding up costs address space, not memory. The allocator is registered once per process.
    """
    global _ENV_ARENA_REGISTERED
    ort = onnxruntime_module()
    if not _ENV_ARENA_REGISTERED:
        memory_info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(memory_info, ort.OrtArenaCfg({"arena_extend_strategy": ARENA_DOUBLING_REGIONS}))
        _ENV_ARENA_REGISTERED = True
    options.add_session_config_entry("session.use_env_allocators", "1")


def keep_dequantize_separate(options) -> None:
    """Session graph optimisation up to level 1 only, for bundles with quantized frozen weights.

    At level 2 ORT fuses each int4 DequantizeLinear + MatMul of the forward pass into MatMulNBits,
    which repacks the weight into a new initializer (a second copy per session, beside the original the
    backward's DequantizeLinear still reads) and runs with int8 activations. Random 1.1B Llama, int4 with
    embeddings, 1 x 128: peak RSS 3.93 -> 3.13 GB, the same step time.
    """
    ort = onnxruntime_module()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def free_tensors_at_last_use(options) -> None:
    """Turn off ORT's planned buffer reuse, so every tensor's memory is freed after its last reader.

    With reuse on, ORT's allocation planner reserves a freed tensor's buffer for a later tensor of the
    same size; in a training graph that later tensor is often in the backward pass, so forward
    temporaries' buffers stay held through the whole forward pass (SmolLM2-135M at 4 x 256: peak RSS
    4299 -> 2897 MB without reuse, the same step time). ORTModule turns it off for the same reason.
    """
    options.enable_mem_reuse = False


def training_memory_settings(options) -> None:
    """What a training graph needs of a stock InferenceSession besides `free_tensors_at_last_use`.

    - No memory pattern: the planner's pattern pre-allocates one block for a whole run's tensors,
      sized by the first batch shape, and keeps it.
    - No pre-packing: MLAS packs every constant MatMul weight into a second, tiled copy at load time
      (the frozen weights twice in memory); the training API never pre-packed.
    - Priority-based execution order: the order ORT's training build used for the backward graph.
    """
    ort = onnxruntime_module()
    options.enable_mem_pattern = False
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED


def without_arena(options) -> None:
    """No CPU memory arena, for bundles with quantized frozen weights: freed tensors go back to the system.

    Both sessions map quantized_weights.data; with an arena the memory of the last training step stays
    held while evaluation maps the file again (random 1.1B Llama, int4 with embeddings, 1 x 128: peak
    RSS 3123 -> 2419 MB, the same step time). Float32 bundles keep the shared arena, ~30% faster there.
    """
    options.enable_cpu_mem_arena = False


def load_parameters(path: Path, names: list[str], shapes: dict[str, list[int]] | None = None) -> dict[str, np.ndarray]:
    """The trainable tensors from a safetensors file, as float32 arrays keyed by graph name (with `shapes`,
    {name: shape} of the manifest, exactly those tensors with those shapes)."""
    from .adapter import load_adapter

    return fit_parameters(load_adapter(path), names, shapes, str(path))


def fit_parameters(arrays: dict[str, np.ndarray], names: list[str], shapes: dict[str, list[int]] | None,
                   where: str) -> dict[str, np.ndarray]:
    """`load_parameters`' checks and conversion for tensors already read (`where` names their source)."""
    if shapes is not None:
        from .adapter_tensors import require_adapter_fits

        require_adapter_fits(shapes, arrays, where)
    missing = [name for name in names if name not in arrays]
    if missing:
        from .errors import RunError

        raise RunError(f"{where} lacks {len(missing)} trainable tensors (e.g. {missing[0]})",
                       hint="use adapter weights made for this bundle")
    return {name: np.ascontiguousarray(arrays[name], dtype=np.float32) for name in names}


def node_placement(session_path: str, options, providers, feeds_for_profile) -> dict[str, int]:
    """How many nodes each execution provider ran, from one profiled run of a fresh session."""
    import json
    import tempfile

    ort = onnxruntime_module()
    with tempfile.TemporaryDirectory(prefix="ortft-profile-") as folder:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(folder, "profile")
        session = ort.InferenceSession(session_path, options, providers=providers)
        session.run(None, feeds_for_profile)
        profile = session.end_profiling()
        events = json.loads(Path(profile).read_text(encoding="utf-8"))
    counts: dict[str, set] = {}
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") == "Node" and "provider" in args:
            counts.setdefault(args["provider"], set()).add(args.get("node_index", event.get("name")))
    return {provider: len(nodes) for provider, nodes in counts.items()}


class TrainingSession:
    """The training and eval graphs of a bundle over one set of trainable tensors, and their optimizer.

    `parameters` (a safetensors file, or None for the bundle's initial adapter) gives the starting
    values. `providers` is ORT's providers list ([(name, options), ...]; CPU when None): ORT places
    each node on the first provider that can run it. `with_optimizer=False` skips AdamW's state.
    `graphs` (training graph, eval graph) names other graph files of the bundle with the same trainable
    tensors: the frozen-prefix cache's suffix graphs (ortft/prefix_cache.py).
    """

    def __init__(self, bundle_dir, parameters=None, providers=None, threads: int | None = None,
                 verbose: bool = False, with_optimizer: bool = True, manifest: dict | None = None,
                 graphs: tuple[str, str] | None = None):
        from .manifest import read_manifest
        from .optimizer import AdamW, AdamWSettings, FlatTensors

        ort = onnxruntime_module()
        set_log_level(verbose)
        self.bundle_dir = Path(bundle_dir)
        self.manifest = BundleManifest.of(manifest) if manifest is not None else read_manifest(self.bundle_dir)
        self.trainable = self.manifest.trainable_names
        if parameters is not None:
            initial = load_parameters(Path(parameters), self.trainable, self.manifest.trainable_shapes)
        else:  # the bundle's initial adapter: its file and the manifest's zero tensors (ortft/initial_adapter.py)
            from .initial_adapter import initial_parameters

            initial = initial_parameters(self.bundle_dir, self.manifest)
        self.params = FlatTensors({name: initial[name].shape for name in self.trainable})
        self.params.assign(initial)
        del initial
        self.grads = FlatTensors(self.params.shapes)
        self._micro_grads = FlatTensors(self.params.shapes)  # the second and later micro-batches' gradients
        self.micro_batches = 0
        self.optimizer = AdamW(self.params, AdamWSettings.from_manifest(self.manifest.optimizer)) \
            if with_optimizer else None
        self.providers = providers or [("CPUExecutionProvider", {})]
        self.threads = threads
        self.verbose = verbose
        self.quantized = (self.bundle_dir / QUANTIZED_DATA).exists()
        self.training_graph, self.eval_graph = graphs or (TRAINING_GRAPH, EVAL_GRAPH)
        self._ort = ort
        self._train_session = None
        self._eval_session = None
        self._bindings: dict = {}  # (session, gradient target) -> IO binding with the parameters bound
        self.last_grad_norm = None

    # sessions --------------------------------------------------------------------------------
    def _options(self):
        options = session_options(self.threads, self.verbose)
        free_tensors_at_last_use(options)
        training_memory_settings(options)
        if self.quantized:
            keep_dequantize_separate(options)
            without_arena(options)
        elif self.providers[0][0] == "CPUExecutionProvider":
            use_shared_arena(options)
            reuse_large_blocks()
        return options

    def _session(self, graph: str):
        from .errors import BundleError

        try:
            return self._ort.InferenceSession(str(self.bundle_dir / graph), self._options(), providers=self.providers)
        except Exception as exc:  # ORT raises Fail/InvalidGraph/RuntimeError for graphs it cannot load
            first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else exc.__class__.__name__
            raise BundleError(f"onnxruntime cannot load {self.bundle_dir / graph}: {first}",
                              hint="`ortft validate` the bundle; a bundle prepared before ortft ran on stock "
                                   "onnxruntime needs `ortft upgrade BUNDLE` (or prepare again)") from exc

    @property
    def train_session(self):
        if self._train_session is None:
            self._train_session = self._session(self.training_graph)
        return self._train_session

    @property
    def eval_session(self):
        if self._eval_session is None:
            self._eval_session = self._session(self.eval_graph)
        return self._eval_session

    @property
    def input_names(self) -> list[str]:
        return [value.name for value in self.train_session.get_inputs() if value.name not in self.params.views]

    def _binding(self, session, grads):
        """The session's IO binding with the parameters and (for training) the gradient buffers bound;
        made once per (session, gradient target) and reused: each step binds only the batch."""
        key = (id(session), id(grads))
        cached = self._bindings.get(key)
        if cached is not None:
            return cached
        ort = self._ort
        binding = session.io_binding()
        graph_inputs = [value.name for value in session.get_inputs()]
        for name in graph_inputs:
            if name in self.params.views:
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(self.params[name]))
        batch_names = [name for name in graph_inputs if name not in self.params.views]
        output_names = [value.name for value in session.get_outputs()]
        results = []  # bound in graph order: get_outputs() lists them so (re-binding keeps a name's place)
        for name in output_names:
            if grads is not None and name.endswith(GRAD_SUFFIX) and name[:-len(GRAD_SUFFIX)] in grads.views:
                binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(grads[name[:-len(GRAD_SUFFIX)]]))
            else:
                binding.bind_output(name)
                results.append(name)
        self._bindings[key] = (binding, batch_names, output_names, results)
        return self._bindings[key]

    def _run(self, session, batch: dict, grads):
        binding, batch_names, output_names, results = self._binding(session, grads)
        for name in batch_names:
            binding.bind_cpu_input(name, np.ascontiguousarray(batch[name]))
        for name in results:
            binding.bind_output(name)  # unbind last run's value: ORT allocates the loss (and logits) anew
        session.run_with_iobinding(binding)
        values = binding.get_outputs()
        outputs = [values[index].numpy() for index, name in enumerate(output_names) if name in results]
        return outputs[0] if len(outputs) == 1 else outputs  # as ORT's training API returned them

    # training --------------------------------------------------------------------------------
    def train_step_forward_backward(self, batch: dict):
        """Forward and backward on one micro-batch; gradients are summed until `optimizer_step`.
        Returns the loss (an array), or the list of the graph's non-gradient outputs (loss first) if several."""
        target = self.grads if self.micro_batches == 0 else self._micro_grads
        outputs = self._run(self.train_session, batch, target)
        if self.micro_batches:
            self.grads.flat += self._micro_grads.flat
        self.micro_batches += 1
        return outputs

    def optimizer_step(self, learning_rate: float) -> None:
        """AdamW on the summed gradients (nothing happens if no micro-batch ran), then reset them."""
        if self.micro_batches == 0:
            return
        self.last_grad_norm = self.optimizer.step(self.grads.flat, float(learning_rate))
        self.micro_batches = 0

    def gradients(self) -> dict[str, np.ndarray]:
        """The gradients summed since the last optimizer step (copies)."""
        return self.grads.to_dict()

    def evaluate(self, batch: dict):
        return self._run(self.eval_session, batch, None)

    def release_idle_memory(self) -> None:
        """Call before and after an evaluation pass: gives back freed heap (malloc_trim) and the pages of
        frozen_weights.data and quantized_weights.data either session mapped. Otherwise the eval session's
        pages stay counted on top of the next training step's peak (SmolLM2 float, 6 steps with 3
        evaluations: 1953 -> 1380 MB); dropped pages read back from the page cache (`ortft/memory.py`)."""
        release_freed_memory()
        for data_file in (QUANTIZED_DATA, FROZEN_DATA):
            if (self.bundle_dir / data_file).exists():
                drop_mapped_pages(self.bundle_dir / data_file)

    # parameters ------------------------------------------------------------------------------
    def parameter(self, name: str) -> np.ndarray:
        return self.params[name]

    def set_parameter(self, name: str, value) -> None:
        self.params[name][...] = np.asarray(value, dtype=np.float32)

    def parameter_names(self) -> list[str]:
        return list(self.trainable)

    def trainable_names(self) -> list[str]:
        return list(self.trainable)

    def adapter(self) -> dict[str, np.ndarray]:
        return self.params.to_dict()

    def optimizer_state(self) -> tuple[dict[str, np.ndarray], int]:
        """AdamW's moments by name and its step count (empty without an optimizer)."""
        if self.optimizer is None:
            return {}, 0
        return self.optimizer.state_dict(), self.optimizer.step_count

    def load_optimizer_state(self, state: dict[str, np.ndarray], step: int) -> None:
        self.optimizer.load_state_dict(state, step)

    def placement(self, batch: dict) -> dict[str, int]:
        """Nodes per execution provider of the training graph, from one profiled run (a separate session)."""
        feeds = {name: np.ascontiguousarray(batch[name]) for name in self.input_names}
        feeds.update(self.params.to_dict(copy=False))
        return node_placement(str(self.bundle_dir / self.training_graph), self._options(), self.providers, feeds)
