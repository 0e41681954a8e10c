"""The device-side training loop over a bundle: schedule, accumulation, evaluation, checkpoints, resume.

`train(TrainConfig) -> dict` (the final summary). Stock onnxruntime computes each micro-batch's loss
and gradients (ortft/runtime.py); the gradients of `grad_accum` micro-batches are summed before one
AdamW step (ortft/optimizer.py); AdamW is invariant to a gradient's scale, so this matches averaging
except for the clipping threshold, which applies to the sum. SIGINT/SIGTERM finish the current step,
save a checkpoint and stop; a NaN or infinite loss stops before the optimizer step and never
overwrites a good checkpoint.
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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from . import run as runs
from .adapter import read_initial_adapter
from .config import TrainConfig
from .data import BatchIterator, DataConfig, LoaderPosition, load_train_and_valid
from .errors import ConfigError, RunError, TrainingDivergedError
from .evaluate import EvalResult, evaluate, scalar
from .fsutil import check_output_dir, disk_error, sha256_file, write_json_atomic, write_text_atomic
from .manifest import manifest_digest
from .optimizer import ADAMW_UPDATE
from .prefix_cache import expected_batches, open_prefix_cache, prefix_cache_section, suffix_graphs
from .schedule import learning_rate
from .threads import default_threads
from .validate import require_valid

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
def graceful_signals(stop: StopRequest):
    def handler(signum, _frame):
        if stop:  # a second signal: the user insists
            raise KeyboardInterrupt
        stop.signal_name = signal.Signals(signum).name
        click.echo(f"\n{stop.signal_name}: finishing this step, then saving a checkpoint (again to abort)", err=True)

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
    notes: list[str] = field(default_factory=list)


def plan_steps(config: TrainConfig, batches_per_epoch: int) -> RunPlan:
    if config.steps is not None and config.epochs is not None:
        raise ConfigError("give --steps or --epochs, not both")
    steps_per_epoch = batches_per_epoch / config.grad_accum
    if config.steps is not None:
        if config.steps < 1:
            raise ConfigError(f"--steps {config.steps} must be at least 1")
        total = config.steps
    else:
        epochs = 1.0 if config.epochs is None else config.epochs
        if epochs <= 0:
            raise ConfigError(f"--epochs {epochs} must be positive")
        total = max(1, math.ceil(epochs * steps_per_epoch))
    return RunPlan(total, batches_per_epoch, steps_per_epoch)


def check_config(config: TrainConfig) -> None:
    for name in ("batch_size", "grad_accum", "seq_len", "eval_every", "save_every", "keep"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value} must be a whole number of at least 1")
    if not config.lr > 0:
        raise ConfigError(f"--lr {config.lr} must be positive")
    if config.warmup < 0:
        raise ConfigError(f"--warmup {config.warmup} must not be negative")
    if config.valid is not None and config.valid_fraction is not None:
        raise ConfigError("give --valid or --valid-fraction, not both")
    if config.valid_fraction is not None and not 0.0 < config.valid_fraction < 1.0:
        raise ConfigError(f"--valid-fraction {config.valid_fraction} must lie between 0 and 1")


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


def _report_placement(session, providers, batch_inputs: dict, quiet: bool) -> dict:
    """With an accelerator, how many training-graph nodes each provider took (one profiled run of a
    separate session); ORT runs on the CPU whatever the accelerator cannot. CPU alone: {} (no profiling)."""
    from .providers import CPU_PROVIDER

    if providers[0][0] == CPU_PROVIDER:
        return {}
    counts = session.placement(batch_inputs)
    total = sum(counts.values())
    if not quiet:
        click.echo("note: training graph nodes per execution provider: " +
                   ", ".join(f"{name} {count} of {total}" for name, count in sorted(counts.items(), key=lambda kv: -kv[1])),
                   err=True)
    return counts


def train(config: TrainConfig, quiet: bool = False, on_step=None) -> dict:
    """Run (or resume) training as `config` says; returns the summary also written to summary.json.

    `on_step(session, step, lr)`, if given, runs after every optimizer step (federated FedProx uses it
    for its proximal pull towards the global adapter).
    """
    from .providers import describe_providers, resolve_for_training
    from .runtime import TrainingSession
    from .tokenizer import load_tokenizer
    from .tokenizer_facts import tokenizer_notes

    check_config(config)
    bundle = Path(config.bundle)
    run_dir = Path(config.out)
    manifest = require_valid(bundle)
    bundle_digest = manifest_digest(bundle)
    if not config.resume and run_dir.exists() and any(run_dir.iterdir()):
        check_output_dir(run_dir, force=False)
    if config.resume and not runs.is_run_dir(run_dir):
        raise RunError(f"--resume: {run_dir} is not a run folder", hint="drop --resume to start a new run there")
    task = manifest.task
    max_len = manifest.max_seq_len
    if config.seq_len > max_len:
        raise ConfigError(f"--seq-len {config.seq_len} exceeds the bundle's max_seq_len {max_len}", hint=f"use at most {max_len}")
    providers = resolve_for_training(config.provider)
    device = describe_providers(providers)
    threads = config.threads or default_threads()

    tokenizer = load_tokenizer(manifest.tokenizer_path(bundle))
    data_config = DataConfig.from_train_config(config, task=task, label_names=manifest.labels)
    train_set, valid_set = load_train_and_valid(config.data, tokenizer, data_config, config.valid, config.valid_fraction)
    data_sha = {"train": train_set.sha256}
    if config.valid:
        data_sha["valid"] = sha256_file(config.valid)
    batches = BatchIterator(train_set, data_config)
    plan = plan_steps(config, batches.batches_per_epoch)

    resume_folder, resume_state = _resume_state(config, run_dir, bundle_digest, data_sha)
    start_step = int(resume_state["step"]) if resume_state else 0
    position = LoaderPosition.from_dict(resume_state["data_position"]) if resume_state else None
    best = dict(resume_state.get("best") or {}) if resume_state else {}
    init_adapter = read_initial_adapter(manifest, Path(config.init_adapter)) if config.init_adapter and not resume_state else None

    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume_state:
        write_json_atomic(run_dir / runs.RUN_FILE, {
            "format": "ortft-run",
            "bundle": runs.bundle_reference(run_dir, bundle),
            "bundle_manifest_sha256": bundle_digest,
            "task": task,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            # file names only: run.json travels with the run; the data's sha256 is in every checkpoint
            "data": {"train": Path(config.data).name, "valid": Path(config.valid).name if config.valid else None},
        })
    resolved = config.to_dict()
    resolved.update({"threads": threads, "device": device, "total_steps": plan.total_steps})
    write_json_atomic(run_dir / runs.CONFIG_FILE, resolved)

    stats = train_set.stats
    notes = []
    if stats.fewer_examples_than_batch_size and not config.batch_tokens:
        notes.append(f"only {stats.num_examples} training examples, fewer than --batch-size {config.batch_size}: training on what there is")
    if stats.num_truncated:
        notes.append(f"{stats.num_truncated} training examples were longer than --seq-len {config.seq_len} and were truncated")
    if stats.num_without_labels:
        notes.append(f"{stats.num_without_labels} training examples had no token left to learn from and were dropped")
    if manifest.optimizer.get("update") != ADAMW_UPDATE:
        notes.append("this bundle was prepared with the old transformers.AdamW update; ortft now always makes "
                     "PyTorch's AdamW update (its losses differ from runs made before)")
    notes.extend(tokenizer_notes(bundle, manifest))  # a GGUF bundle prepared before its tokenizer kept the GGUF's tokens
    for note in notes:
        click.echo(f"note: {note}", err=True)

    prefix_section = prefix_cache_section(manifest, bundle) if config.prefix_cache else None  # issue 26
    session = TrainingSession(bundle, parameters=(resume_folder / runs.ADAPTER_FILE) if resume_folder else None,
                              providers=providers, threads=threads, verbose=config.verbose, manifest=manifest,
                              graphs=suffix_graphs(prefix_section))
    if prefix_section:  # the suffix graphs, fed each row's prefix output, computed once (ortft/prefix_cache.py)
        session = open_prefix_cache(session, prefix_section, run_dir, config.prefix_cache_mb, expected_batches(
            batches, valid_set, data_config, config.max_eval_batches))
    if resume_folder:
        saved_optimizer = runs.read_optimizer_state(resume_folder)
        if saved_optimizer is None:
            raise RunError(f"checkpoint {resume_folder} holds no optimizer state to resume from",
                           hint="start a new run with --init-adapter pointing at its adapter.safetensors")
        session.load_optimizer_state(*saved_optimizer)
    _seed_ort(config.seed + start_step)
    trainable = manifest.trainable_names
    for name, value in (init_adapter or {}).items():  # e.g. a global adapter in federated training
        session.set_parameter(name, value)
    # A resume keeps the records up to its checkpoint; a run that starts (over) at step 0 keeps none.
    metrics = MetricsLog(run_dir / runs.METRICS_FILE, keep_through_step=start_step if resume_state else -1)

    def adapter_now() -> dict[str, np.ndarray]:
        return {name: session.parameter(name) for name in trainable}

    def save(step: int, data_position: LoaderPosition, lr: float) -> Path:
        state = {
            "step": step,
            "epoch": data_position.epoch,
            "data_position": data_position.to_dict(),
            "learning_rate": lr,
            "rng": {"seed": config.seed, "ort_seed": config.seed + step, "shuffle": "numpy default_rng((seed, stream, epoch))"},
            "config": config.to_dict(),
            "bundle_manifest_sha256": bundle_digest,
            "data_sha256": data_sha,
            "best": best,
            "first_eval_loss": first_eval.loss if first_eval else None,
            "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        optimizer_state, optimizer_step = session.optimizer_state()
        folder = runs.write_checkpoint(run_dir, step, adapter_now(), state, optimizer_state, optimizer_step)
        protect = {run_dir / best["checkpoint"]} if best.get("checkpoint") else set()
        runs.prune_checkpoints(run_dir, config.keep, protect)
        return folder

    def run_eval(step: int) -> EvalResult | None:
        if valid_set is None:
            return None
        result = evaluate(session, valid_set, data_config, task, config.max_eval_batches)
        metrics.write({"step": step, **result.as_record()})
        return result

    started = time.perf_counter()
    placement = None  # nodes per execution provider, measured on the first batch
    stop = StopRequest()
    stop_after = config.extra.get("stop_after")
    trained_tokens = 0
    train_seconds = 0.0
    first_eval = None
    if resume_state and resume_state.get("first_eval_loss") is not None:
        first_eval = EvalResult(float(resume_state["first_eval_loss"]), 0, 0)
    last_loss = float("nan")
    step = start_step
    stream = batches.batches(position)
    data_position = position or LoaderPosition(fingerprint=batches.fingerprint)
    lr = learning_rate(max(step, 1), plan.total_steps, config.lr, config.warmup, config.schedule)
    if not resume_state and valid_set is not None:
        first_eval = run_eval(0)
        if first_eval and not quiet:
            click.echo(f"step 0: eval loss {first_eval.loss:.4f}", err=True)
    progress = None
    if not quiet:
        from tqdm import tqdm

        progress = tqdm(total=plan.total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)
    try:
        with graceful_signals(stop):
            while step < plan.total_steps:
                step += 1
                lr = learning_rate(step, plan.total_steps, config.lr, config.warmup, config.schedule)
                t0 = time.perf_counter()
                loss_sum = 0.0
                label_tokens = 0
                tokens = 0
                for _micro in range(config.grad_accum):
                    batch, data_position = next(stream)
                    if batch.num_label_tokens == 0:
                        continue  # nothing to learn in this batch (every label masked)
                    loss = scalar(session.train_step_forward_backward(batch.inputs))
                    if placement is None:
                        placement = _report_placement(session, providers, batch.inputs, quiet)
                    if not math.isfinite(loss):
                        raise TrainingDivergedError(
                            f"the loss became {loss} at step {step}; training stopped before the optimizer step",
                            hint="lower --lr or raise --warmup; the last good checkpoint was kept; --resume continues from it",
                        )
                    loss_sum += loss * batch.num_label_tokens
                    label_tokens += batch.num_label_tokens
                    tokens += batch.num_tokens
                session.optimizer_step(lr)
                if on_step is not None:
                    on_step(session, step, lr)
                seconds = time.perf_counter() - t0
                train_seconds += seconds
                trained_tokens += tokens
                last_loss = loss_sum / max(label_tokens, 1)
                record = {"step": step, "loss": last_loss, "lr": lr, "tokens_per_s": tokens / seconds if seconds else 0.0,
                          "tokens": tokens, "label_tokens": label_tokens, "epoch": data_position.epoch}
                metrics.write(record)
                if progress is not None:
                    progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                    progress.update(1)
                saved = False
                if step % config.eval_every == 0 or step == plan.total_steps:
                    result = run_eval(step)
                    if result is not None and (not best or result.loss < best["eval_loss"]):
                        # Record the new best before saving: its trainer state then holds it, and pruning
                        # protects this checkpoint rather than the previous best.
                        best.update({"checkpoint": f"{runs.CHECKPOINTS}/{runs.step_dir_name(step)}", "step": step,
                                     "eval_loss": result.loss})
                        folder = save(step, data_position, lr)
                        saved = True
                        runs.write_best(run_dir, folder, step, result.loss)
                if not saved and (step % config.save_every == 0 or step == plan.total_steps or stop or step == stop_after):
                    save(step, data_position, lr)
                if stop or step == stop_after:
                    break
    finally:
        if progress is not None:
            progress.close()
        metrics.close()
        if prefix_section:
            session.close()  # removes the cache's spill file

    finished = step >= plan.total_steps
    summary = {
        "event": "summary",
        "step": step,
        "total_steps": plan.total_steps,
        "finished": finished,
        "stopped_by": stop.signal_name or ("stop_after" if not finished else None),
        "final_train_loss": last_loss,
        "first_eval_loss": first_eval.loss if first_eval else None,
        "best_eval_loss": best.get("eval_loss"),
        "best_step": best.get("step"),
        "seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "tokens_per_s": trained_tokens / train_seconds if train_seconds else 0.0,
        "peak_rss_mb": peak_rss_mb(),
        "provider": device,
        "nodes_per_provider": placement or None,
        "prefix_cache": session.store.stats.to_dict() if prefix_section else None,
        "data": stats.to_dict(),
        "notes": notes,
    }
    try:
        with open(run_dir / runs.METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(summary) + "\n")
    except OSError as exc:
        raise disk_error(exc, run_dir / runs.METRICS_FILE) from exc
    write_json_atomic(run_dir / "summary.json", summary)
    return summary
