"""The frozen-prefix cache of `ortft train`: each example row's prefix output is computed once, then reused.

With adapters only in the last layers, the hidden state entering the first adapted layer depends on the
row's tokens and the frozen weights alone. A bundle that records `prefix_cache` (ortft/prepare/
prefix_graphs.py) has a prefix graph (embeddings and frozen layers) and suffix training and eval graphs
that start from that hidden state. `PrefixCachedSession` wraps the TrainingSession of the suffix graphs:
for every batch it takes each row's hidden states from `HiddenStateStore`, runs the prefix graph only on
the rows it has not seen, and hands the suffix graphs the assembled [batch, seq, hidden] tensor.

A row is keyed by the sha256 of its tokens and positions (a packed row holds several examples that attend
to each other, so the row, not the example, is the unit), so any batch (padded, packed, `--batch-tokens`,
shuffled, evaluation) is assembled from cached rows. Rows are right-padded; padding positions get zeros:
no labelled position attends to them and they carry no label, so the loss and gradients are those of the
uncached graphs. Entries live in memory up to a budget (`--prefix-cache-mb`; default a quarter of the
memory available when training starts) and spill, float32, to a scratch file in the run folder beyond
it, removed when training ends. A resumed run builds its cache again (a cache never outlives its process).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BundleError, ConfigError

log = logging.getLogger(__name__)

DEFAULT_MEMORY_FRACTION = 0.25  # of MemAvailable when training starts, without --prefix-cache-mb
SPILL_PREFIX = ".ortft-tmp-prefix-cache-"
MB = 1024 * 1024


def default_budget_bytes() -> int:
    """A quarter of the memory available now (256 MB when unknown)."""
    from .memory import available_memory_bytes

    available = available_memory_bytes()
    return int(available * DEFAULT_MEMORY_FRACTION) if available else 256 * MB


def budget_bytes(prefix_cache_mb: float | None) -> int:
    """`--prefix-cache-mb` in bytes (None: the default from free memory); 0 keeps every row on disk."""
    if prefix_cache_mb is None:
        return default_budget_bytes()
    if isinstance(prefix_cache_mb, bool) or not isinstance(prefix_cache_mb, (int, float)) or prefix_cache_mb < 0:
        raise ConfigError(f"--prefix-cache-mb {prefix_cache_mb!r} must be a number of megabytes, 0 or more",
                          hint="0 keeps the whole cache in the spill file; leave it out for a quarter of free memory")
    return int(prefix_cache_mb * MB)


@dataclass
class CacheStats:
    rows: int = 0
    hits: int = 0
    misses: int = 0
    memory_bytes: int = 0
    spilled_bytes: int = 0
    prefix_runs: int = 0

    def to_dict(self) -> dict:
        return {"rows": self.rows, "hits": self.hits, "misses": self.misses, "memory_mb": self.memory_bytes / MB,
                "spilled_mb": self.spilled_bytes / MB, "prefix_runs": self.prefix_runs}


class HiddenStateStore:
    """Float32 [length, hidden] arrays by key: in memory up to `budget` bytes, then in a spill file in `folder`."""

    def __init__(self, hidden_size: int, budget: int, folder: Path):
        self.hidden_size = hidden_size
        self.budget = budget
        self.folder = Path(folder)
        self.stats = CacheStats()
        self._memory: dict[bytes, np.ndarray] = {}
        self._spilled: dict[bytes, tuple[int, int]] = {}  # key -> (offset, rows) in the spill file
        self._spill_fd: int | None = None
        self._spill_path: Path | None = None
        self._spill_end = 0
        remove_stale_spill_files(self.folder)

    def __contains__(self, key: bytes) -> bool:
        return key in self._memory or key in self._spilled

    def __len__(self) -> int:
        return len(self._memory) + len(self._spilled)

    def get(self, key: bytes) -> np.ndarray:
        found = self._memory.get(key)
        if found is not None:
            return found
        offset, rows = self._spilled[key]
        data = os.pread(self._spill_fd, rows * self.hidden_size * 4, offset)
        return np.frombuffer(data, dtype=np.float32).reshape(rows, self.hidden_size)

    def put(self, key: bytes, hidden: np.ndarray) -> None:
        hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        if self.stats.memory_bytes + hidden.nbytes <= self.budget:
            self._memory[key] = hidden.copy()  # a copy: `hidden` may be a view of a whole batch's output
            self.stats.memory_bytes += hidden.nbytes
        else:
            self._spill(key, hidden)
        self.stats.rows += 1

    def _spill(self, key: bytes, hidden: np.ndarray) -> None:
        if self._spill_fd is None:
            handle, name = tempfile.mkstemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", suffix=".f32", dir=self.folder)
            self._spill_fd, self._spill_path = handle, Path(name)
            log.info("prefix cache: memory budget %.1f MB reached, spilling to %s", self.budget / MB, name)
        data = hidden.tobytes()
        written = os.pwrite(self._spill_fd, data, self._spill_end)
        if written != len(data):
            raise OSError(28, f"short write to {self._spill_path}")
        self._spilled[key] = (self._spill_end, hidden.shape[0])
        self._spill_end += len(data)
        self.stats.spilled_bytes += len(data)

    @property
    def spill_path(self) -> Path | None:
        return self._spill_path

    def close(self) -> None:
        """Forget every entry and remove the spill file."""
        self._memory.clear()
        self._spilled.clear()
        if self._spill_fd is not None:
            os.close(self._spill_fd)
            self._spill_fd = None
            try:
                self._spill_path.unlink()
            except FileNotFoundError:
                pass


def remove_stale_spill_files(folder: Path) -> None:
    """Remove spill files in `folder` left by a training process that was killed (its pid is gone)."""
    from .fsutil import _process_alive

    for path in Path(folder).glob(SPILL_PREFIX + "*.f32"):
        pid = path.name[len(SPILL_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            path.unlink(missing_ok=True)
            log.warning("removed %s, left by an interrupted run (process %s is gone)", path, pid)


def row_key(input_ids: np.ndarray, position_ids: np.ndarray) -> bytes:
    """A row's identity: the sha256 of its tokens and positions (int64, padding excluded)."""
    digest = hashlib.sha256(np.ascontiguousarray(input_ids, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(position_ids, dtype=np.int64).tobytes())
    return digest.digest()


def row_lengths(attention_mask: np.ndarray) -> np.ndarray | None:
    """Each row's length if every row is right-padded (ones, then zeros), else None."""
    lengths = attention_mask.sum(axis=1)
    columns = np.arange(attention_mask.shape[1])
    if not np.array_equal(attention_mask != 0, columns[None, :] < lengths[:, None]):
        return None
    return lengths


def batch_row_keys(batch: dict) -> tuple[np.ndarray, list[bytes]] | None:
    """(row lengths, row keys) of a right-padded causal-LM batch; None if a row is not right-padded."""
    lengths = row_lengths(batch["attention_mask"])
    if lengths is None:
        return None
    input_ids, position_ids = batch["input_ids"], batch["position_ids"]
    return lengths, [row_key(input_ids[b, :length], position_ids[b, :length]) for b, length in enumerate(lengths)]


def prefix_cache_section(manifest: dict, bundle_dir: Path) -> dict | None:
    """The manifest's `prefix_cache` section, with its graphs checked to be files the manifest lists."""
    section = manifest.get("prefix_cache")
    if not section:
        return None
    if not isinstance(section, dict):
        raise BundleError(f"{bundle_dir}/manifest.json: prefix_cache is not an object", hint="prepare the bundle again")
    files = manifest.get("files") or {}
    for key in ("prefix_graph", "training_graph", "eval_graph"):
        name = section.get(key)
        if not isinstance(name, str) or "/" in name or "\\" in name or name not in files:
            raise BundleError(f"{bundle_dir}/manifest.json: prefix_cache.{key} {name!r} is not a file of the bundle",
                              hint="prepare the bundle again, or train with --no-prefix-cache")
    hidden = section.get("hidden_size")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise BundleError(f"{bundle_dir}/manifest.json: prefix_cache.hidden_size {hidden!r} is not a positive whole number",
                          hint="prepare the bundle again")
    return section


class PrefixCachedSession:
    """A TrainingSession over the suffix graphs whose batches are the bundle graphs' batches: it adds each
    row's cached prefix output (`hidden_states`) and runs the prefix graph on rows not yet cached.
    Everything else (parameters, optimizer, memory release) is the wrapped session's."""

    def __init__(self, session, section: dict, store: HiddenStateStore, expected_batches=()):
        self.session = session
        self.section = section
        self.store = store
        self.hidden_input = section.get("hidden_states", "hidden_states")
        self._prefix = None
        # Rows training and evaluation will see: once all are cached the prefix graph's session is closed.
        self._pending = {key for batch in expected_batches for key in (batch_row_keys(batch) or ((), ()))[1]}

    def __getattr__(self, name):
        return getattr(self.session, name)

    @property
    def prefix_session(self):
        if self._prefix is None:
            self._prefix = self.session._session(self.section["prefix_graph"])
        return self._prefix

    def release_prefix(self) -> None:
        """Close the prefix graph's session (its weight mappings and buffers go): every row is cached."""
        self._prefix = None

    def _prefix_hidden(self, batch: dict, rows: list[int], width: int) -> np.ndarray:
        session = self.prefix_session
        names = [value.name for value in session.get_inputs()]
        feeds = {name: np.ascontiguousarray(batch[name][rows, :width]) for name in names}
        self.store.stats.prefix_runs += 1
        return session.run([self.hidden_input], feeds)[0]

    def suffix_inputs(self, batch: dict) -> dict:
        """`batch` with `hidden_states` [batch, seq, hidden] from the cache (the prefix graph fills it first)."""
        attention_mask = batch["attention_mask"]
        rows = batch_row_keys(batch)
        if rows is None:  # not right-padded (ortft's batches always are): no caching, the same result
            hidden = self._prefix_hidden(batch, list(range(attention_mask.shape[0])), attention_mask.shape[1])
            return {**batch, self.hidden_input: hidden}
        lengths, keys = rows
        missing = [b for b, key in enumerate(keys) if key not in self.store]
        hidden = np.zeros((*attention_mask.shape, self.store.hidden_size), dtype=np.float32)
        if missing:  # one prefix run for the new rows, as wide as the longest of them
            computed = self._prefix_hidden(batch, missing, int(lengths[missing].max()))
            for index, b in enumerate(missing):
                if keys[b] not in self.store:  # the same row twice in one batch is stored once
                    self.store.put(keys[b], computed[index, :lengths[b]])
                    self.store.stats.misses += 1
                hidden[b, :lengths[b]] = computed[index, :lengths[b]]
        computed_rows = set(missing)
        for b, key in enumerate(keys):
            if b not in computed_rows:
                hidden[b, :lengths[b]] = self.store.get(key)
        self.store.stats.hits += len(keys) - len(missing)
        if self._pending:
            self._pending.difference_update(keys)
            if not self._pending:
                self.release_prefix()
        return {**batch, self.hidden_input: hidden}

    def train_step_forward_backward(self, batch: dict):
        return self.session.train_step_forward_backward(self.suffix_inputs(batch))

    def evaluate(self, batch: dict):
        return self.session.evaluate(self.suffix_inputs(batch))

    def placement(self, batch: dict) -> dict[str, int]:
        return self.session.placement(self.suffix_inputs(batch))

    def close(self) -> None:
        self.release_prefix()
        self.store.close()


def suffix_graphs(section: dict | None) -> tuple[str, str] | None:
    """(training graph, eval graph) a TrainingSession runs: the suffix graphs with a prefix cache."""
    return (section["training_graph"], section["eval_graph"]) if section else None


def open_prefix_cache(session, section: dict, run_dir: Path, prefix_cache_mb: float | None,
                      expected_batches=()) -> PrefixCachedSession:
    """Wrap a TrainingSession of the suffix graphs; `expected_batches` are the batches training and
    evaluation will run (their rows tell when the prefix graph is no longer needed)."""
    store = HiddenStateStore(int(section["hidden_size"]), budget_bytes(prefix_cache_mb), run_dir)
    return PrefixCachedSession(session, section, store, expected_batches)


def expected_batches(batches, valid_set, data_config, max_eval_batches: int | None):
    """The input arrays of one training epoch's batches and of the evaluation's batches (their rows are
    every row the run sees)."""
    from .data import iter_eval_batches

    for batch in batches.epoch_batches(0):
        yield batch.inputs
    if valid_set is not None:
        for batch in iter_eval_batches(valid_set, data_config, max_eval_batches):
            yield batch.inputs


def cached_loss(bundle_dir: Path, manifest: dict, batch: dict, threads: int | None = None) -> float:
    """The loss the prefix graph and the suffix eval graph give for `batch` with the initial adapter
    (`ortft validate` compares it with the full eval graph's)."""
    from .runtime import TrainingSession

    section = prefix_cache_section(manifest, Path(bundle_dir))
    session = TrainingSession(bundle_dir, threads=threads, with_optimizer=False, manifest=manifest,
                              graphs=suffix_graphs(section))
    with tempfile.TemporaryDirectory(prefix="ortft-prefix-check-") as scratch:
        cached = open_prefix_cache(session, section, Path(scratch), 1.0)
        try:
            outputs = cached.evaluate(batch)
        finally:
            cached.close()
    return float(np.asarray(outputs[0] if isinstance(outputs, list) else outputs))
