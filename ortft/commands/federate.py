"""`ortft federate`: federated fine-tuning with Flower (only the adapter travels).

  ortft federate local BUNDLE --shard a.jsonl --shard b.jsonl ... --out RUN   a whole federation on loopback
  ortft federate app DIR                                                     the Flower App folder for `flwr run`
"""

from __future__ import annotations

import click

from ..cli_paths import InputPath
from ..config import FEDERATED_STRATEGIES, FederationConfig
from ..default_seq_len import SEQ_LEN_DEFAULT_HELP, fitted_seq_len
from ..schedule import SCHEDULES

_defaults = FederationConfig()


@click.group("federate")
def command() -> None:
    """Federated fine-tuning with Flower: each device trains the adapter on its own data."""


@command.command("local")
@click.argument("bundle", type=click.Path())
@click.option("--shard", "shards", multiple=True, required=True,
              type=InputPath("pass a JSONL file of training examples for each node (docs/data.md)", dir_okay=False), help="One node's training data (JSONL); repeat, one SuperNode each.")
@click.option("--valid", "valid", multiple=True,
              type=InputPath("pass a JSONL file of validation examples for each node (docs/data.md)", dir_okay=False), help="One node's validation data; repeat, one per --shard in the same order.")
@click.option("--valid-fraction", type=float, default=None, help="Hold out this fraction of each shard for validation instead.")
@click.option("--out", required=True, type=click.Path(), help="The run folder (global adapter per round, metrics.jsonl, logs/).")
@click.option("--rounds", type=int, default=_defaults.rounds, show_default=True,
              help="Federated rounds: each sends the global adapter to the nodes, trains it there and combines the replies.")
@click.option("--local-steps", type=int, default=_defaults.local_steps, show_default=True, help="Optimizer steps each node runs per round.")
@click.option("--strategy", type=click.Choice(FEDERATED_STRATEGIES), default=_defaults.strategy,
              show_default=True, help="How the nodes' adapters are combined; fedmedian, trimmed-mean and krum (Flower's "
                                      "FedMedian, FedTrimmedAvg, Krum) resist a minority of bad nodes.")
@click.option("--proximal-mu", type=float, default=_defaults.proximal_mu, show_default=True, help="FedProx: weight of the pull towards the global adapter.")
@click.option("--server-lr", type=float, default=_defaults.server_lr, show_default=True, help="FedAdam: the server's learning rate.")
@click.option("--dp-clip", "dp_clip", type=click.FloatRange(min=0.0), default=_defaults.dp_clip, metavar="NORM",
              help="Differential privacy (Flower's server-side fixed clipping): clip each node's update to this L2 norm.  [default: off]")
@click.option("--dp-noise", "dp_noise", type=click.FloatRange(min=0.0), default=_defaults.dp_noise, metavar="SIGMA",
              help="With --dp-clip: Gaussian noise of SIGMA x NORM / min-nodes added to each round's aggregate.")
@click.option("--max-update-norm", type=click.FloatRange(min=0.0), default=_defaults.max_update_norm,
              help="Refuse a reply whose update has a larger L2 norm.  [default: 10 x local-steps x lr x sqrt(trainable parameters)]")
@click.option("--max-examples", type=click.IntRange(min=1), default=_defaults.max_examples, show_default=True,
              help="Refuse a reply that claims more training examples (its weight in the mean).")
@click.option("--lr", type=float, default=_defaults.lr, show_default=True, help="The nodes' learning rate.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=_defaults.schedule, show_default=True, help="The nodes' schedule within a round.")
@click.option("--batch-size", type=int, default=_defaults.batch_size, show_default=True, help="Examples per batch on each node.")
@click.option("--seq-len", type=int, default=None, help=f"The nodes' row length in tokens (longer examples are truncated).  {SEQ_LEN_DEFAULT_HELP}")
@click.option("--seed", type=int, default=_defaults.seed, show_default=True, help="Seed of the nodes' data order (each round adds its number).")
@click.option("--min-nodes", type=int, default=None, help="Nodes that must be connected before a round starts (default: every shard).")
@click.option("--round-timeout", type=float, default=_defaults.round_timeout, show_default=True, help="Seconds to wait for the nodes' replies; late nodes are left out of the round.")
@click.option("--keep", type=int, default=_defaults.keep, show_default=True, help="Round checkpoints to keep (the best is kept too).")
@click.option("--threads", type=int, default=None, help="ORT threads per node.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last saved round.")
def local(bundle, shards, valid, valid_fraction, out, rounds, local_steps, strategy, proximal_mu, server_lr, dp_clip, dp_noise,
          max_update_norm, max_examples, lr, schedule, batch_size, seq_len, seed, min_nodes, round_timeout, keep, threads, resume) -> None:
    """Run a federation on this machine: Flower's SuperLink and one SuperNode per --shard, on 127.0.0.1."""
    from ..federated.local import LocalSettings, run_local

    if seq_len is None:
        seq_len = fitted_seq_len(bundle)
    settings = LocalSettings(
        bundle=bundle, shards=list(shards), out=out, valid=list(valid) or None, valid_fraction=valid_fraction,
        threads=threads, min_nodes=min_nodes,
        run_config={"rounds": rounds, "local-steps": local_steps, "strategy": strategy, "proximal-mu": proximal_mu,
                    "server-lr": server_lr, "dp-clip": dp_clip, "dp-noise": dp_noise, "max-update-norm": max_update_norm,
                    "max-examples": max_examples, "lr": lr, "schedule": schedule, "batch-size": batch_size, "seq-len": seq_len,
                    "seed": seed, "round-timeout": float(round_timeout), "keep": keep, "resume": resume},
    )
    record = run_local(settings, echo=lambda line: click.echo(line, err=True))
    losses = ", ".join(f"{name} {item['eval_loss']:.4f}" for name, item in sorted(record.get("eval_loss_per_client", {}).items()))
    overall = record.get("eval_loss")
    click.echo(f"round {record['round']}: validation loss {overall:.4f}" if overall is not None else f"round {record['round']}", err=True)
    if losses:
        click.echo(f"  per node: {losses}", err=True)
    if record.get("bytes_sent") is not None:
        click.echo(f"  sent {record['bytes_sent']} bytes this round (adapter {record['adapter_bytes']} B per node; "
                   f"base model weights {record['base_model_bytes']} B)", err=True)
    click.echo(f"run: {out}  (ortft export {out} --out EXPORT)", err=True)


@command.command("app")
@click.argument("folder", type=InputPath("name a folder to write the app into, not a file", exists=False, file_okay=False))
def app(folder) -> None:
    """Write the Flower App folder (pyproject.toml) to ship with `flwr run FOLDER <superlink>`."""
    from ..federated.appdir import write_app

    write_app(folder)
    click.echo(f"wrote {folder}/pyproject.toml; run it with: flwr run {folder} <superlink connection> --run-config run.toml", err=True)
