"""`ortft train`: fine-tune a bundle's adapters on JSONL data on this device (no torch needed)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import click

from ..cli_paths import InputPath
from ..config import TrainConfig
from ..default_seq_len import SEQ_LEN_DEFAULT_HELP, fitted_seq_len
from ..errors import ConfigError
from ..progress import TrainReporter
from ..schedule import SCHEDULES

_defaults = TrainConfig()


def load_yaml_config(path: str) -> dict:
    """The options of a run.yaml, with dashes or underscores in their names."""
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    known = {f.name for f in fields(TrainConfig)}
    result = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"config file {path}: unknown option '{key}'", hint=f"known options: {', '.join(sorted(known))}")
        result[name] = value
    return result


class TerminalReporter(TrainReporter):
    """Prints a run's notes and messages to stderr and shows its steps as a tqdm progress bar."""

    def __init__(self):
        self.progress = None

    def note(self, text: str) -> None:
        click.echo(f"note: {text}", err=True)

    def message(self, text: str) -> None:
        click.echo(text, err=True)

    def start(self, total_steps: int, first_step: int) -> None:
        import sys

        from tqdm import tqdm

        self.progress = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def step(self, record: dict) -> None:
        self.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        self.progress.update(1)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None


# Recorded settings that a resume does not take over from the run folder.
_NOT_RESUMED = ("bundle", "out", "resume", "extra", "verbose")


def recorded_config(run_dir: str) -> dict:
    """The settings a run folder's config.json recorded ({} if it has none), for --resume."""
    from ..run import read_config

    known = {f.name for f in fields(TrainConfig)} - set(_NOT_RESUMED)
    return {name: value for name, value in read_config(run_dir).items() if name in known}


def build_config(ctx: click.Context, values: dict) -> TrainConfig:
    """Defaults < the run's recorded settings (with --resume) < --config file < flags given on the command line.

    So `ortft train BUNDLE --out RUN --data D --resume` continues with the settings the run began with.
    `seq_len` stays None when no source gives one (the command then fits the default to the bundle).
    """
    from_file = load_yaml_config(values["config"]) if values.get("config") else {}
    given = {name for name in values if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    resume = values["resume"] if "resume" in given else from_file.get("resume", False)
    out = values["out"] if "out" in given else from_file.get("out", values.get("out"))
    merged = recorded_config(out) if resume and out else {}
    merged.update(from_file)
    for name, value in values.items():
        if name in ("config", "stop_after"):
            continue
        if name in given or name not in merged:
            merged[name] = value
    config = TrainConfig(**{k: v for k, v in merged.items() if k in {f.name for f in fields(TrainConfig)}})
    if values.get("stop_after"):
        config.extra["stop_after"] = values["stop_after"]
    return config


@click.command("train")
@click.argument("bundle", type=click.Path())
@click.option("--data", default=None, type=InputPath("pass a JSONL file of training examples (docs/data.md)", dir_okay=False), help="Training data (JSONL).  [required, or data: in --config]")
@click.option("--out", default=None, help="The run folder (checkpoints, metrics, adapter).  [required, or out: in --config]")
@click.option("--valid", default=None, type=InputPath("pass a JSONL file of validation examples (docs/data.md)", dir_okay=False),
              help="Validation data (JSONL).")
@click.option("--valid-fraction", type=float, default=None, help="Hold out this fraction of --data for validation.")
@click.option("--steps", type=int, default=None, help="Optimizer steps to train (default: one epoch).")
@click.option("--epochs", type=float, default=None, help="Epochs to train instead of --steps.")
@click.option("--batch-size", type=int, default=_defaults.batch_size, show_default=True, help="Examples per micro-batch.")
@click.option("--grad-accum", type=int, default=_defaults.grad_accum, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--seq-len", type=int, default=None, help=f"Truncate examples to this many tokens.  {SEQ_LEN_DEFAULT_HELP}")
@click.option("--lr", type=float, default=_defaults.lr, show_default=True, help="Peak learning rate.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=_defaults.schedule, show_default=True,
              help="The learning rate after the warm-up: cosine or linear decay to 0, or constant.")
@click.option("--warmup", type=int, default=_defaults.warmup, show_default=True, help="Linear warm-up steps.")
@click.option("--mask-prompt/--no-mask-prompt", default=None, help="Learn only completions / assistant turns (default: on for those formats).")
@click.option("--pack", is_flag=True, default=False, help="Pack several examples into each row (see docs/data.md).")
@click.option("--batch-tokens", type=int, default=None,
              help="Batches of examples of similar length, as many as fit in this many tokens (rows x longest row), "
                   "instead of --batch-size examples; at least --seq-len (see docs/data.md).")
@click.option("--max-example-chars", type=click.IntRange(min=1), default=None,
              help="Characters of an example read before tokenizing; longer ones are cut and counted as truncated, and a "
                   "JSONL line may hold 6 bytes per character plus 64 KiB.  [default: 64 x --seq-len]")
@click.option("--prefix-cache/--no-prefix-cache", default=_defaults.prefix_cache, show_default=True,
              help="With a bundle prepared with --layers N: compute the frozen layers' output once per example row and "
                   "reuse it in later epochs and evaluations (the same losses; see docs/cli.md).")
@click.option("--prefix-cache-mb", type=click.FloatRange(min=0), default=None,
              help="Memory for the frozen-prefix cache; beyond it rows spill (float32) to a scratch file in --out, "
                   "removed at the end.  [default: a quarter of the memory available]")
@click.option("--eval-every", type=int, default=_defaults.eval_every, show_default=True,
              help="Evaluate on the validation data every N steps and at the last one; a new best eval loss is saved "
                   "as a checkpoint (best.json names it).")
@click.option("--max-eval-batches", type=int, default=None, help="Evaluate on at most this many batches.")
@click.option("--save-every", type=int, default=_defaults.save_every, show_default=True,
              help="Save a checkpoint every N steps, at the last step and when stopped (--resume continues from it).")
@click.option("--keep", type=int, default=_defaults.keep, show_default=True, help="Checkpoints to keep (the best is kept too).")
@click.option("--resume", is_flag=True, help="Continue from the newest valid checkpoint in --out, with the run's recorded settings (flags override).")
@click.option("--stop-after", type=int, default=None, help="Stop (and save) after this step, as if interrupted; --resume continues.")
@click.option("--init-adapter", default=None, type=InputPath(
    "pass the adapter.safetensors of a run or of `ortft export --format adapter`", dir_okay=False), help="Start from these adapter weights (adapter.safetensors of a run or an `export --format adapter`).")
@click.option("--seed", type=int, default=_defaults.seed, show_default=True,
              help="Seed of the data order (shuffling, --valid-fraction's split) and of ORT's random numbers (LoRA dropout).")
@click.option("--threads", type=int, default=None, help="ORT intra-op threads (default: physical cores).")
@click.option("--provider", default=_defaults.provider, show_default=True, help="Execution provider: auto (the best installed), cpu, cuda, openvino, ... "
              "NAME[:key=value,...]; nodes it cannot run go to the CPU (docs/providers.md).")
@click.option("--config", "config", type=click.Path(), default=None, help="A YAML file with these options; flags override it.")
@click.option("--verbose", is_flag=True, help="Show ONNX Runtime's logs.")
@click.pass_context
def command(ctx, bundle, **values):
    """Fine-tune BUNDLE's adapters on --data; checkpoints and metrics go to --out."""
    from ..train import train

    config = build_config(ctx, values)
    config.bundle = bundle
    if config.seq_len is None:  # given nowhere: the default, or the bundle's max_seq_len if that is smaller
        config.seq_len = fitted_seq_len(bundle)
        if config.seq_len < _defaults.seq_len:
            click.echo(f"note: --seq-len {config.seq_len}, the bundle's max_seq_len (the default {_defaults.seq_len} "
                       "is longer)", err=True)
    summary = train(config, reporter=TerminalReporter())
    best = summary["best_eval_loss"]
    first = summary["first_eval_loss"]
    click.echo(
        f"{'finished' if summary['finished'] else 'stopped'} at step {summary['step']}/{summary['total_steps']}: "
        f"train loss {summary['final_train_loss']:.4f}"
        + (f", eval loss {first:.4f} -> best {best:.4f} (step {summary['best_step']})" if best is not None and first is not None else "")
        + (f", best eval loss {best:.4f}" if best is not None and first is None else "")
        + f"; {summary['tokens_per_s']:.0f} tokens/s over {summary['train_seconds']:.1f} s of training steps, "
          f"peak RSS {summary['peak_rss_mb']:.0f} MB",
        err=True,
    )
    if not summary["finished"]:
        click.echo(f"resume with: ortft train {bundle} --out {config.out} --data {config.data} --resume", err=True)
    click.echo(f"run: {config.out}", err=True)
