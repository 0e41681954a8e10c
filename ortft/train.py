"""The device-side training loop over a bundle: schedule, accumulation, evaluation, checkpoints, resume.

`train(TrainConfig) -> dict` (the final summary). Stock onnxruntime computes each micro-batch's loss
and gradients (ortft/runtime.py); the gradients of `grad_accum` micro-batches are summed before one
AdamW step (ortft/optimizer.py); AdamW is invariant to a gradient's scale, so this matches averaging
except for the clipping threshold, which applies to the sum. SIGINT/SIGTERM finish the current step,
save a checkpoint and stop; a NaN or infinite loss stops before the optimizer step and never
overwrites a good checkpoint.

`train` reads as a recipe: `TrainConfig.check` (the settings, once), `setup` (bundle, data, plan, resume
point, run records, session), `train_step`, `evaluate_and_save` (`run_eval`, `save_checkpoint`) and `finish`
(the summary). Notes, messages and progress go to a `TrainReporter` (ortft/progress.py) the caller supplies.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import resource
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import run as runs
from .adapter import read_initial_adapter
from .config import TrainConfig
from .data import BatchIterator, DataConfig, LoaderPosition, TokenizedDataset, load_train_and_valid
from .errors import ConfigError, RunError, TrainingDivergedError
from .evaluate import EvalResult, evaluate, scalar
from .fsutil import check_output_dir, disk_error, sha256_file, write_json_atomic, write_text_atomic
from .manifest import manifest_digest
from .optimizer import ADAMW_UPDATE
from .prefix_cache import expected_batches, open_prefix_cache, prefix_cache_section, suffix_graphs
from .progress import LogReporter, TrainReporter
from .schedule import learning_rate
from .threads import default_threads
from .validate import require_valid

if TYPE_CHECKING:  # the runtime imports onnxruntime: loaded when a session is opened
    from .bundle import BundleManifest
    from .runtime import TrainingSession

log = logging.getLogger(__name__)

# Settings that must not change across a resume (they change which batches or updates happen).
RESUME_FIXED = ("batch_size", "grad_accum", "seq_len", "seed", "pack", "batch_tokens", "mask_prompt", "lr", "schedule", "warmup")
# Settings a resume may change, with a warning (the run then differs from an uninterrupted one, or evaluates differently).
RESUME_WARNED = ("steps", "epochs", "eval_every", "save_every", "keep", "max_eval_batches", "valid", "valid_fraction")


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (Linux reports KB)."""
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / 1024.0 if sys.platform != "darwin" else usage / (1024.0 * 1024.0)


@dataclass
class StopRequest:
    """Set by SIGINT/SIGTERM; the loop finishes its step, saves, and stops."""

    signal_name: str | None = None

    def __bool__(self) -> bool:
        return self.signal_name is not None


@contextmanager
def graceful_signals(stop: StopRequest, reporter: TrainReporter):
    def handler(signum, _frame):
        if stop:  # a second signal: the user insists
            raise KeyboardInterrupt
        stop.signal_name = signal.Signals(signum).name
        reporter.message(f"\n{stop.signal_name}: finishing this step, then saving a checkpoint (again to abort)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl, flushed per record."""

    def __init__(self, path: Path, keep_through_step: int | None):
        self.path = path
        if keep_through_step is not None and path.exists():
            self._truncate_after(keep_through_step)
        self.handle = open(path, "a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(record, dict) and record.get("step", 0) <= step and record.get("event") != "summary":
                kept.append(line)
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        try:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()
        except OSError as exc:
            raise disk_error(exc, self.path) from exc

    def close(self) -> None:
        self.handle.close()


@dataclass
class RunPlan:
    total_steps: int
    batches_per_epoch: int
    steps_per_epoch: float


def plan_steps(config: TrainConfig, batches_per_epoch: int) -> RunPlan:
    """--steps, or --epochs (default one) of `batches_per_epoch` in steps of grad_accum batches (config checked already)."""
    steps_per_epoch = batches_per_epoch / config.grad_accum
    if config.steps is not None:
        total = config.steps
    else:
        epochs = 1.0 if config.epochs is None else config.epochs
        total = max(1, math.ceil(epochs * steps_per_epoch))
    return RunPlan(total, batches_per_epoch, steps_per_epoch)


def check_fits_bundle(config: TrainConfig, manifest: BundleManifest) -> None:
    """The settings that depend on the bundle: --seq-len at most its max_seq_len."""
    max_len = manifest.max_seq_len
    if config.seq_len > max_len:
        raise ConfigError(f"--seq-len {config.seq_len} exceeds the bundle's max_seq_len {max_len}", hint=f"use at most {max_len}")


def _resume_state(config: TrainConfig, run_dir: Path, bundle_digest: str, data_sha: dict) -> tuple[Path | None, dict | None]:
    if not config.resume:
        return None, None
    run_info = runs.read_run(run_dir)
    if not runs.trained_on(run_info, Path(config.bundle)):
        raise RunError(
            f"the bundle changed since run {run_dir} began (manifest sha256 differs)",
            hint="resume with the same bundle, or start a new run with another --out",
        )
    folder = runs.newest_valid_checkpoint(run_dir)
    if folder is None:
        log.warning("no valid checkpoint in %s: starting from step 0", run_dir)
        return None, None
    state = runs.read_state(folder)
    for key, sha in data_sha.items():
        if state.get("data_sha256", {}).get(key) not in (None, sha):
            raise RunError(
                f"the {key} data file changed since the checkpoint (sha256 differs)",
                hint="resume with the same data, or start a new run",
            )
    saved = state.get("config", {})
    changed = [name for name in RESUME_FIXED if name in saved and saved[name] != getattr(config, name)]
    if changed:
        detail = ", ".join(f"{name} {saved[name]!r} -> {getattr(config, name)!r}" for name in changed)
        raise RunError(f"cannot resume with changed settings: {detail}", hint="resume with the settings the run began with")
    warned = [name for name in RESUME_WARNED if name in saved and saved[name] != getattr(config, name)]
    if warned:
        detail = ", ".join(f"{name} {saved[name]!r} -> {getattr(config, name)!r}" for name in warned)
        log.warning("resuming with changed settings: %s%s", detail,
                    " (the learning-rate schedule follows the new total)" if {"steps", "epochs"} & set(warned) else "")
    return folder, state


def _seed_ort(seed: int) -> None:
    """Seed ORT's own random generator (LoRA dropout) where the build exposes it."""
    from .runtime import onnxruntime_module

    capi = getattr(onnxruntime_module(), "capi", None)
    setter = getattr(getattr(capi, "_pybind_state", None), "set_seed", None)
    if setter is not None:
        setter(int(seed))


def _placement_note(session, providers, batch_inputs: dict) -> tuple[dict, str | None]:
    """With an accelerator, how many training-graph nodes each provider took (one profiled run of a
    separate session; ORT runs on the CPU whatever the accelerator cannot), and the note saying so.
    CPU alone: ({}, None), without profiling."""
    from .providers import CPU_PROVIDER

    if providers[0][0] == CPU_PROVIDER:
        return {}, None
    counts = session.placement(batch_inputs)
    total = sum(counts.values())
    return counts, ("training graph nodes per execution provider: " +
                    ", ".join(f"{name} {count} of {total}" for name, count in sorted(counts.items(), key=lambda kv: -kv[1])))


@dataclass
class TrainingRun:
    """One run as `setup` made it and `train_step` advances it: bundle, data, session, plan, and progress so far."""

    config: TrainConfig
    bundle: Path
    run_dir: Path
    manifest: BundleManifest
    bundle_digest: str
    providers: list
    device: str
    data_config: DataConfig
    train_set: TokenizedDataset
    valid_set: TokenizedDataset | None
    data_sha: dict
    plan: RunPlan
    notes: list[str]
    session: TrainingSession
    metrics: MetricsLog
    stream: Iterator
    data_position: LoaderPosition
    step: int
    resumed: bool
    best: dict
    first_eval: EvalResult | None
    lr: float = 0.0
    last_loss: float = float("nan")
    trained_tokens: int = 0
    train_seconds: float = 0.0
    placement: dict | None = None  # nodes per execution provider, measured on the first batch
    prefix_section: dict | None = None  # the frozen-prefix cache's manifest section when the session uses it (issue 26)

    @property
    def task(self) -> str:
        return self.manifest.task


def train(config: TrainConfig, quiet: bool = False, on_step=None, reporter: TrainReporter | None = None) -> dict:
    """Run (or resume) training as `config` says; returns the summary also written to summary.json.

    The recipe: check the settings, `setup`, evaluate the start, then `train_step` and `evaluate_and_save`
    until the plan's last step (or a signal, or --stop-after), and `finish`. `reporter` hears the notes,
    messages and progress (ortft/progress.py; the CLI supplies one that prints); without one they go to
    the log, notes at INFO with `quiet`. `on_step(session, step, lr)`, if given, runs after every optimizer
    step (federated FedProx uses it for its proximal pull towards the global adapter).
    """
    reporter = reporter or LogReporter(logging.INFO if quiet else logging.WARNING)
    config.check()
    run = setup(config, reporter)
    started = time.perf_counter()
    stop = StopRequest()
    stop_after = config.extra.get("stop_after")
    try:
        if not run.resumed and run.valid_set is not None:
            run.first_eval = run_eval(run, 0)
            reporter.message(f"step 0: eval loss {run.first_eval.loss:.4f}")
        reporter.start(run.plan.total_steps, run.step)
        with graceful_signals(stop, reporter):
            while run.step < run.plan.total_steps:
                reporter.step(train_step(run, on_step, reporter))
                evaluate_and_save(run, stop, stop_after)
                if stop or run.step == stop_after:
                    break
    finally:
        reporter.close()
        run.metrics.close()
        if run.prefix_section:
            run.session.close()  # removes the cache's spill file
    return finish(run, stop, started)


def setup(config: TrainConfig, reporter: TrainReporter) -> TrainingRun:
    """Open the bundle, load and plan the data, find the resume point, record the run, open the session."""
    from .providers import describe_providers, resolve_for_training

    bundle, run_dir = Path(config.bundle), Path(config.out)
    manifest = require_valid(bundle)
    bundle_digest = manifest_digest(bundle)
    _check_run_folder(config, run_dir)
    check_fits_bundle(config, manifest)
    providers = resolve_for_training(config.provider)
    device = describe_providers(providers)
    threads = config.threads or default_threads()
    data_config, train_set, valid_set, data_sha = load_data(config, bundle, manifest)
    batches = BatchIterator(train_set, data_config)
    plan = plan_steps(config, batches.batches_per_epoch)

    resume_folder, resume_state = _resume_state(config, run_dir, bundle_digest, data_sha)
    init_adapter = read_initial_adapter(manifest, Path(config.init_adapter)) if config.init_adapter and not resume_state else None
    _write_run_records(config, run_dir, bundle, manifest, bundle_digest, resume_state is None,
                       {"threads": threads, "device": device, "total_steps": plan.total_steps})
    notes = run_notes(config, bundle, manifest, train_set, valid_set)
    for note in notes:
        reporter.note(note)

    start_step = int(resume_state["step"]) if resume_state else 0
    prefix_section = prefix_cache_section(manifest, bundle) if config.prefix_cache else None  # issue 26
    cached_batches = expected_batches(batches, valid_set, data_config, config.max_eval_batches) if prefix_section else ()
    session = open_session(config, bundle, manifest, providers, threads, resume_folder, init_adapter, prefix_section, cached_batches)
    _seed_ort(config.seed + start_step)
    position = LoaderPosition.from_dict(resume_state["data_position"]) if resume_state else None
    first_eval = None
    if resume_state and resume_state.get("first_eval_loss") is not None:
        first_eval = EvalResult(float(resume_state["first_eval_loss"]), 0, 0)
    return TrainingRun(
        config=config, bundle=bundle, run_dir=run_dir, manifest=manifest, bundle_digest=bundle_digest,
        providers=providers, device=device, data_config=data_config, train_set=train_set, valid_set=valid_set,
        data_sha=data_sha, plan=plan, notes=notes, session=session,
        # A resume keeps the records up to its checkpoint; a run that starts (over) at step 0 keeps none.
        metrics=MetricsLog(run_dir / runs.METRICS_FILE, keep_through_step=start_step if resume_state else -1),
        stream=batches.batches(position), data_position=position or LoaderPosition(fingerprint=batches.fingerprint),
        step=start_step, resumed=resume_state is not None,
        best=dict(resume_state.get("best") or {}) if resume_state else {}, first_eval=first_eval,
        prefix_section=prefix_section,
    )


def _check_run_folder(config: TrainConfig, run_dir: Path) -> None:
    """A new run needs an empty or new --out; --resume needs a run folder there."""
    if not config.resume and run_dir.exists() and any(run_dir.iterdir()):
        check_output_dir(run_dir, force=False)
    if config.resume and not runs.is_run_dir(run_dir):
        raise RunError(f"--resume: {run_dir} is not a run folder", hint="drop --resume to start a new run there")


def load_data(config: TrainConfig, bundle: Path, manifest: BundleManifest) -> tuple[DataConfig, TokenizedDataset, TokenizedDataset | None, dict]:
    """The training and validation sets, tokenized with the bundle's tokenizer, and the sha256 of their files."""
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer(manifest.tokenizer_path(bundle))
    data_config = DataConfig.from_train_config(config, task=manifest.task, label_names=manifest.labels)
    train_set, valid_set = load_train_and_valid(config.data, tokenizer, data_config, config.valid, config.valid_fraction)
    data_sha = {"train": train_set.sha256}
    if config.valid:
        data_sha["valid"] = sha256_file(config.valid)
    return data_config, train_set, valid_set, data_sha


def _write_run_records(config: TrainConfig, run_dir: Path, bundle: Path, manifest: BundleManifest, bundle_digest: str, new_run: bool,
                       resolved: dict) -> None:
    """run.json for a new run; config.json (the settings as resolved for this start) every time."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if new_run:
        write_json_atomic(run_dir / runs.RUN_FILE, {
            "format": "ortft-run",
            "bundle": runs.bundle_reference(run_dir, bundle),
            "bundle_manifest_sha256": bundle_digest,
            "task": manifest.task,
            "created": _now(),
            # file names only: run.json travels with the run; the data's sha256 is in every checkpoint
            "data": {"train": Path(config.data).name, "valid": Path(config.valid).name if config.valid else None},
        })
    write_json_atomic(run_dir / runs.CONFIG_FILE, {**config.to_dict(), **resolved})


def run_notes(config: TrainConfig, bundle: Path, manifest: BundleManifest, train_set: TokenizedDataset,
              valid_set: TokenizedDataset | None) -> list[str]:
    """What the user should know about this run's data and bundle, said once (and kept in the summary)."""
    from .tokenizer_facts import tokenizer_notes

    notes = train_set.stats.notes("training", config.seq_len, None if config.batch_tokens else config.batch_size)
    if config.valid and valid_set is not None:  # a --valid-fraction part is counted with its file above
        notes.extend(valid_set.stats.notes("validation", config.seq_len, None))
    if manifest.optimizer.get("update") != ADAMW_UPDATE:
        notes.append("this bundle was prepared with the old transformers.AdamW update; ortft now always makes "
                     "PyTorch's AdamW update (its losses differ from runs made before)")
    notes.extend(tokenizer_notes(bundle, manifest))  # a GGUF bundle prepared before its tokenizer kept the GGUF's tokens
    return notes


def open_session(config: TrainConfig, bundle: Path, manifest: BundleManifest, providers, threads: int, resume_folder: Path | None,
                 init_adapter: dict[str, np.ndarray] | None, prefix_section: dict | None = None, cached_batches=()) -> TrainingSession:
    """The training session with the adapter to start from: a checkpoint's (and its optimizer state), --init-adapter's, or the bundle's.

    With `prefix_section` it runs the suffix graphs, fed each row's prefix output, computed once (ortft/prefix_cache.py);
    `cached_batches` are the batches the run will see."""
    from .runtime import TrainingSession

    session = TrainingSession(bundle, parameters=(resume_folder / runs.ADAPTER_FILE) if resume_folder else None,
                              providers=providers, threads=threads, verbose=config.verbose, manifest=manifest,
                              graphs=suffix_graphs(prefix_section))
    if prefix_section:
        session = open_prefix_cache(session, prefix_section, Path(config.out), config.prefix_cache_mb, cached_batches)
    if resume_folder:
        saved_optimizer = runs.read_optimizer_state(resume_folder)
        if saved_optimizer is None:
            raise RunError(f"checkpoint {resume_folder} holds no optimizer state to resume from",
                           hint="start a new run with --init-adapter pointing at its adapter.safetensors")
        session.load_optimizer_state(*saved_optimizer)
    for name, value in (init_adapter or {}).items():  # e.g. a global adapter in federated training
        session.set_parameter(name, value)
    return session


def train_step(run: TrainingRun, on_step, reporter: TrainReporter) -> dict:
    """One optimizer step: the gradients of grad_accum micro-batches summed, one AdamW update; returns the
    step's metrics record (also written to metrics.jsonl). A non-finite loss stops before the update."""
    config = run.config
    run.step += 1
    run.lr = learning_rate(run.step, run.plan.total_steps, config.lr, config.warmup, config.schedule)
    t0 = time.perf_counter()
    loss_sum = 0.0
    label_tokens = 0
    tokens = 0
    for _micro in range(config.grad_accum):
        batch, run.data_position = next(run.stream)
        if batch.num_label_tokens == 0:
            continue  # nothing to learn in this batch (every label masked)
        loss = scalar(run.session.train_step_forward_backward(batch.inputs))
        if run.placement is None:
            run.placement, note = _placement_note(run.session, run.providers, batch.inputs)
            if note:
                reporter.note(note)
        if not math.isfinite(loss):
            raise TrainingDivergedError(
                f"the loss became {loss} at step {run.step}; training stopped before the optimizer step",
                hint="lower --lr or raise --warmup; the last good checkpoint was kept; --resume continues from it",
            )
        loss_sum += loss * batch.num_label_tokens
        label_tokens += batch.num_label_tokens
        tokens += batch.num_tokens
    run.session.optimizer_step(run.lr)
    if on_step is not None:
        on_step(run.session, run.step, run.lr)
    seconds = time.perf_counter() - t0
    run.train_seconds += seconds
    run.trained_tokens += tokens
    run.last_loss = loss_sum / max(label_tokens, 1)
    record = {"step": run.step, "loss": run.last_loss, "lr": run.lr, "tokens_per_s": tokens / seconds if seconds else 0.0,
              "tokens": tokens, "label_tokens": label_tokens, "epoch": run.data_position.epoch}
    run.metrics.write(record)
    return record


def run_eval(run: TrainingRun, step: int) -> EvalResult | None:
    """Evaluate on the validation set (None without one) and record the result in metrics.jsonl."""
    if run.valid_set is None:
        return None
    result = evaluate(run.session, run.valid_set, run.data_config, run.task, run.config.max_eval_batches)
    run.metrics.write({"step": step, **result.as_record()})
    return result


def evaluate_and_save(run: TrainingRun, stop: StopRequest, stop_after: int | None) -> None:
    """Every --eval-every steps and at the last: evaluate, and save a new best at once; every --save-every
    steps, at the last, on a signal and at --stop-after: save a checkpoint (unless that step's best was just saved)."""
    config, step = run.config, run.step
    last = step == run.plan.total_steps
    if step % config.eval_every == 0 or last:
        result = run_eval(run, step)
        if result is not None and (not run.best or result.loss < run.best["eval_loss"]):
            # Record the new best before saving: its trainer state then holds it, and pruning
            # protects this checkpoint rather than the previous best.
            run.best.update({"checkpoint": f"{runs.CHECKPOINTS}/{runs.step_dir_name(step)}", "step": step,
                             "eval_loss": result.loss})
            runs.write_best(run.run_dir, save_checkpoint(run), step, result.loss)
            return
    if step % config.save_every == 0 or last or stop or step == stop_after:
        save_checkpoint(run)


def save_checkpoint(run: TrainingRun) -> Path:
    """Write the checkpoint of this step (adapter, optimizer state, trainer state) and prune old ones."""
    config = run.config
    state = {
        "step": run.step,
        "epoch": run.data_position.epoch,
        "data_position": run.data_position.to_dict(),
        "learning_rate": run.lr,
        "rng": {"seed": config.seed, "ort_seed": config.seed + run.step, "shuffle": "numpy default_rng((seed, stream, epoch))"},
        "config": config.to_dict(),
        "bundle_manifest_sha256": run.bundle_digest,
        "data_sha256": run.data_sha,
        "best": run.best,
        "first_eval_loss": run.first_eval.loss if run.first_eval else None,
        "saved": _now(),
    }
    adapter = {name: run.session.parameter(name) for name in run.manifest.trainable_names}
    optimizer_state, optimizer_step = run.session.optimizer_state()
    folder = runs.write_checkpoint(run.run_dir, run.step, adapter, state, optimizer_state, optimizer_step)
    protect = {run.run_dir / run.best["checkpoint"]} if run.best.get("checkpoint") else set()
    runs.prune_checkpoints(run.run_dir, config.keep, protect)
    return folder


def finish(run: TrainingRun, stop: StopRequest, started: float) -> dict:
    """The run's summary, appended to metrics.jsonl and written to summary.json."""
    finished = run.step >= run.plan.total_steps
    summary = {
        "event": "summary",
        "step": run.step,
        "total_steps": run.plan.total_steps,
        "finished": finished,
        "stopped_by": stop.signal_name or ("stop_after" if not finished else None),
        "final_train_loss": run.last_loss,
        "first_eval_loss": run.first_eval.loss if run.first_eval else None,
        "best_eval_loss": run.best.get("eval_loss"),
        "best_step": run.best.get("step"),
        "seconds": time.perf_counter() - started,
        "train_seconds": run.train_seconds,
        "tokens_per_s": run.trained_tokens / run.train_seconds if run.train_seconds else 0.0,
        "peak_rss_mb": peak_rss_mb(),
        "provider": run.device,
        "nodes_per_provider": run.placement or None,
        "prefix_cache": run.session.store.stats.to_dict() if run.prefix_section else None,
        "data": run.train_set.stats.to_dict(),
        "notes": run.notes,
    }
    metrics_path = run.run_dir / runs.METRICS_FILE
    try:
        with open(metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(summary) + "\n")
    except OSError as exc:
        raise disk_error(exc, metrics_path) from exc
    write_json_atomic(run.run_dir / "summary.json", summary)
    return summary


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
