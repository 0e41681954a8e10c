"""The Flower ServerApp: a strategy over adapter weights only, one saved global adapter per round.

Run configuration (`flwr run APP --run-config FILE.toml`; defaults in the app's pyproject.toml):
  bundle, out              the server's copy of the bundle; the run folder (created or resumed)
  rounds, local-steps      federated rounds; optimizer steps each node runs per round
  strategy                 fedavg (example-weighted mean, the default) | fedprox | fedadam, or the robust
                           fedmedian | trimmed-mean | krum (Flower's FedMedian, FedTrimmedAvg, Krum)
  proximal-mu, server-lr   FedProx's mu; FedAdam's server learning rate (eta)
  trim-beta                trimmed-mean: the fraction cut at each end (default 0.2)
  krum-malicious-nodes     krum: how many nodes may be malicious (default 0)
  dp-clip, dp-noise        central differential privacy (Flower's DifferentialPrivacyServerSideFixedClipping):
                           each node's update clipped to L2 norm dp-clip, Gaussian noise of dp-noise x dp-clip
                           / min-nodes added to the aggregate (dp-clip 0: off)
  max-update-norm          a reply whose update (adapter minus the global one) has a larger L2 norm is refused
                           (0: automatic, 10 x local-steps x lr x sqrt(trainable parameters))
  max-examples             a reply claiming more training examples than this is refused
  lr, batch-size, seq-len, schedule, warmup, seed   the nodes' local training settings
  min-nodes                nodes that must be connected before a round starts (and are sampled at least)
  round-timeout            seconds to wait for replies; a node that has not answered by then is left out
  resume                   continue the run in `out` from its last saved round
  keep                     round checkpoints to keep (the best is kept too)

Each round: send the global adapter to the sampled nodes, check every reply (ortft/federated/reply_checks.py:
exact tensors, float32, finite, a bounded update norm and example count, sane metrics; a bad reply is that
node's failure and the round goes on), aggregate the others' adapters with the strategy,
evaluate the new global adapter on every node's validation data, append one record to metrics.jsonl
(with the sha256 of the adapter the round started from and of the new one), then save the adapter
(ortft.run.write_checkpoint, atomic). Round 0 evaluates the bundle's own adapter (the base). A node that
dies is left out of the round: the SuperLink replies for it ("Node Unavailable") once it has missed its
heartbeats, or round-timeout passes. A resumed run drops records after its last saved round.
"""

from __future__ import annotations

import re
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log  # Flower's logger: its lines reach `flwr run --stream`

from .. import run as runs
from ..adapter import load_adapter
from ..config import FEDERATED_STRATEGIES, FederationConfig
from ..errors import ConfigError, RunError, UserError
from ..manifest import manifest_digest
from . import runfolder
from .aggregate import (
    adapter_nbytes,
    adapter_sha256,
    from_array_record,
    initial_adapter,
    payload_bytes,
    to_array_record,
    wire_bytes,
)
from .reply_checks import ReplyLimits, eval_reply_problem, screen, train_reply_problem

app = ServerApp()


class ServerSettings(FederationConfig):
    """The federation's settings (fields and defaults: ortft.config.FederationConfig), read from a run configuration."""

    @classmethod
    def from_run_config(cls, run_config: dict) -> ServerSettings:
        known = {name.replace("_", "-"): name for name in cls.__dataclass_fields__}
        values = {}
        for key, value in run_config.items():
            if key in known:
                kind = type(getattr(cls(), known[key]))
                values[known[key]] = kind(value) if kind is not bool else (value if isinstance(value, bool) else str(value).lower() == "true")
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if not self.bundle or not self.out:
            raise ConfigError("the run configuration needs bundle and out", hint='flwr run APP --run-config \'bundle="..." out="..."\'')
        if self.strategy not in FEDERATED_STRATEGIES:
            raise ConfigError(f"strategy {self.strategy!r} is unknown", hint=f"choose one of {', '.join(FEDERATED_STRATEGIES)}")
        for name in ("rounds", "local_steps", "batch_size", "seq_len", "min_nodes", "keep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError("fraction-train must lie in (0, 1]")
        if not 0.0 <= self.trim_beta < 0.5:
            raise ConfigError(f"trim-beta {self.trim_beta} must lie in [0, 0.5)")
        for name in ("krum_malicious_nodes", "dp_clip", "dp_noise", "max_update_norm"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name.replace('_', '-')} must not be negative")
        if self.dp_noise > 0 and self.dp_clip <= 0:
            raise ConfigError("dp-noise needs dp-clip (the clipping norm the noise is scaled by)", hint="give --dp-clip NORM too")
        if self.max_examples < 1:
            raise ConfigError("max-examples must be at least 1")



def make_strategy(settings: ServerSettings):
    """A Flower strategy from flwr.serverapp.strategy (weighted by each node's number of examples where it weighs),
    wrapped in Flower's server-side fixed-clipping differential privacy when dp-clip is set."""
    from flwr.serverapp import strategy as flower

    common = dict(fraction_train=settings.fraction_train, fraction_evaluate=1.0, min_train_nodes=settings.min_nodes,
                  min_evaluate_nodes=settings.min_nodes, min_available_nodes=settings.min_nodes, weighted_by_key="num-examples")
    if settings.strategy == "fedprox":
        strategy = flower.FedProx(proximal_mu=settings.proximal_mu, **common)
    elif settings.strategy == "fedadam":
        strategy = flower.FedAdam(eta=settings.server_lr, **common)
    elif settings.strategy == "fedmedian":
        strategy = flower.FedMedian(**common)
    elif settings.strategy == "trimmed-mean":
        strategy = flower.FedTrimmedAvg(beta=settings.trim_beta, **common)
    elif settings.strategy == "krum":
        strategy = flower.Krum(num_malicious_nodes=settings.krum_malicious_nodes, **common)
    else:
        strategy = flower.FedAvg(**common)
    if settings.dp_clip > 0:
        strategy = flower.DifferentialPrivacyServerSideFixedClipping(
            strategy, noise_multiplier=settings.dp_noise, clipping_norm=settings.dp_clip, num_sampled_clients=settings.min_nodes)
    return strategy


def _node_name(reply, names: dict[int, str], node_id: int | None = None) -> str:
    """The name of the node a reply is about (`node_id`: the node the request went to; default: the sender)."""
    node_id = reply.metadata.src_node_id if node_id is None else node_id
    if reply.has_content() and "node" in reply.content.config_records:
        names[node_id] = str(reply.content["node"]["name"])
    elif reply.has_error():
        found = re.match(r"ortft: node (\S+) refused:", reply.error.reason or "")
        if found:
            names[node_id] = found.group(1)
    return names.get(node_id, f"node-{node_id}")


def _exchange(grid: Grid, messages: list, timeout: float, names: dict[int, str], what: str, rnd: int):
    """Send, wait up to `timeout`, and sort the replies: (good replies, failures, bytes down, bytes up).

    A reply is matched to its request (reply_to_message_id): when a node dies, the SuperLink itself replies
    for it (Flower's "Node Unavailable" error, sent from the SuperLink's own node id)."""
    sent_to = {message.metadata.dst_node_id for message in messages}
    down = sum(wire_bytes(message) for message in messages)
    replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
    recipient = {message.metadata.message_id: message.metadata.dst_node_id for message in messages}  # ids set when pushed
    good, failures, answered = [], [], set()
    for reply in replies:
        node_id = recipient.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        answered.add(node_id)
        name = _node_name(reply, names, node_id)
        if reply.has_error():
            failures.append({"node": name, "node_id": node_id, "reason": reply.error.reason})
            log(WARNING, "round %d %s: %s failed: %s", rnd, what, name, reply.error.reason)
        else:
            good.append(reply)
    for node_id in sorted(sent_to - answered):
        failures.append({"node": names.get(node_id, f"node-{node_id}"), "node_id": node_id,
                         "reason": f"no reply within round-timeout {timeout:g} s"})
        log(WARNING, "round %d %s: %s did not reply within %g s", rnd, what, names.get(node_id, node_id), timeout)
    up = sum(wire_bytes(reply) for reply in good)
    return good, failures, down, up


def _evaluate(strategy, grid, rnd, arrays, eval_config, settings, names, limits: ReplyLimits):
    messages = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(dict(eval_config)), grid))
    good, failures, down, up = _exchange(grid, messages, settings.round_timeout, names, "evaluate", rnd)
    good, refused = screen(good, lambda reply: eval_reply_problem(reply, limits), lambda reply: _node_name(reply, names))
    _log_refused(refused, rnd, "evaluate")
    failures += refused
    per_client = {}
    for reply in good:
        metrics = reply.content["metrics"]
        per_client[_node_name(reply, names)] = {"eval_loss": float(metrics["eval-loss"]), "examples": int(metrics["num-examples"]),
                                                "tokens": int(metrics["eval-tokens"])}
    tokens = sum(item["tokens"] for item in per_client.values())
    overall = sum(item["eval_loss"] * item["tokens"] for item in per_client.values()) / tokens if tokens else None
    return {"eval_loss": overall, "eval_loss_per_client": per_client, "eval_failures": failures,
            "eval_bytes_down": down, "eval_bytes_up": up}


def _log_refused(refused: list[dict], rnd: int, what: str) -> None:
    for failure in refused:
        log(WARNING, "round %d %s: %s: %s", rnd, what, failure["node"], failure["reason"])


def run_federation(grid: Grid, settings: ServerSettings) -> dict:
    """The whole federated run (or its resumption): returns the last round's record."""
    from ..validate import require_valid

    bundle, run_dir = Path(settings.bundle), Path(settings.out)
    manifest = require_valid(bundle)
    digest = manifest_digest(bundle)
    trainable = manifest.trainable_names
    adapter, base_bytes = initial_adapter(bundle, manifest)
    last_round, state = 0, None
    if settings.resume and runs.is_run_dir(run_dir):
        last_round, folder, state = runfolder.resume_point(run_dir, digest)
        if folder is not None:
            adapter = load_adapter(folder / runs.ADAPTER_FILE)
            adapter = {name: adapter[name] for name in trainable}
            log(INFO, "resuming %s after round %d (global adapter sha256 %s)", run_dir, last_round, adapter_sha256(adapter)[:12])
    else:
        runfolder.start_run(run_dir, bundle, digest, manifest.task, {**settings.to_dict(), "kind": "federated"})
    metrics = runfolder.RoundLog(run_dir / runs.METRICS_FILE, keep_through_round=last_round)
    strategy = make_strategy(settings)
    limits = ReplyLimits.for_run(settings.max_update_norm, settings.max_examples, settings.local_steps, settings.lr,
                                 sum(value.size for value in adapter.values()))
    arrays = to_array_record(adapter)
    adapter_size = adapter_nbytes(adapter)
    names: dict[int, str] = {}
    train_config = {"bundle-sha256": digest, "local-steps": settings.local_steps, "lr": settings.lr, "batch-size": settings.batch_size,
                    "seq-len": settings.seq_len, "schedule": settings.schedule, "warmup": settings.warmup, "seed": settings.seed}
    eval_config = {"bundle-sha256": digest, "batch-size": settings.batch_size, "seq-len": settings.seq_len, "seed": settings.seed}
    best = (state or {}).get("best_eval_loss")
    record: dict = {}
    if last_round == 0 and not any(r.get("round") == 0 for r in runfolder.read_rounds(run_dir)):
        base = _evaluate(strategy, grid, 0, arrays, eval_config, settings, names, limits)
        record = {"round": 0, "step": 0, "event": "base", **base, "adapter_sha256": adapter_sha256(adapter),
                  "adapter_bytes": adapter_size, "base_model_bytes": base_bytes}
        metrics.write(record)
        log(INFO, "round 0 (the bundle's adapter): validation loss %s", base["eval_loss"])
    for rnd in range(last_round + 1, settings.rounds + 1):
        started = time.perf_counter()
        adapter_in = adapter_sha256(adapter)
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(dict(train_config)), grid))
        good, failures, down, up = _exchange(grid, messages, settings.round_timeout, names, "train", rnd)
        good, refused = screen(good, lambda reply: train_reply_problem(reply, adapter, limits), lambda reply: _node_name(reply, names))
        _log_refused(refused, rnd, "train")
        failures += refused
        train_losses = {_node_name(r, names): float(r.content["metrics"]["train-loss"]) for r in good}
        train_examples = int(sum(int(r.content["metrics"]["num-examples"]) for r in good))
        new_arrays, train_metrics = strategy.aggregate_train(rnd, good)
        if new_arrays is None:
            metrics.write({"round": rnd, "step": rnd, "event": "failed", "train_failures": failures})
            raise RunError(f"round {rnd}: no node returned an adapter ({len(failures)} failed)",
                           hint="see the failures in metrics.jsonl and the SuperNodes' logs; --resume continues from the last round")
        aggregated = from_array_record(new_arrays)
        if set(aggregated) != set(trainable) or not all(np.isfinite(aggregated[name]).all() for name in trainable):
            raise RunError(f"round {rnd}: the {settings.strategy} aggregate is not a finite adapter of the bundle",
                           hint="see the round's failures in metrics.jsonl; --resume continues from the last saved round")
        arrays = to_array_record({name: aggregated[name] for name in trainable})
        adapter = from_array_record(arrays)
        evaluation = _evaluate(strategy, grid, rnd, arrays, eval_config, settings, names, limits)
        if evaluation["eval_loss"] is not None and (best is None or evaluation["eval_loss"] < best):
            best = evaluation["eval_loss"]
            is_best = True
        else:
            is_best = False
        sent = len(messages)
        record = {
            "round": rnd, "step": rnd, "event": "round", "strategy": settings.strategy,
            "nodes_sampled": sent, "nodes_trained": len(good),
            "train_loss": float(train_metrics["train-loss"]) if train_metrics and "train-loss" in train_metrics else None,
            "train_examples": train_examples,
            "train_loss_per_client": train_losses,
            "train_failures": failures,
            **evaluation,
            "adapter_in_sha256": adapter_in, "adapter_sha256": adapter_sha256(adapter),
            "adapter_bytes": adapter_size,
            "bytes_sent": down, "bytes_received": up,
            "adapter_bytes_sent": payload_bytes(arrays) * sent, "adapter_bytes_received": payload_bytes(arrays) * len(good),
            "base_model_bytes": base_bytes,
            "bytes_sent_vs_base_model": down / base_bytes if base_bytes else None,
            "seconds": time.perf_counter() - started,
        }
        # The record before the checkpoint: a server killed in between resumes from the previous round, whose
        # resumption drops this record (RoundLog); the other way round, a saved round could lack its record.
        metrics.write(record)
        folder = runfolder.save_round(run_dir, rnd, adapter, {
            "bundle_manifest_sha256": digest, "strategy": settings.strategy, "eval_loss": evaluation["eval_loss"],
            "best_eval_loss": best, "settings": settings.to_dict()}, settings.keep)
        if is_best:
            runs.write_best(run_dir, folder, rnd, best)
        log(INFO, "round %d/%d: %d/%d nodes trained, validation loss %s, %d bytes sent (adapter %d B x %d; base model %d B)",
                 rnd, settings.rounds, len(good), sent, evaluation["eval_loss"], down, adapter_size, sent, base_bytes)
    return record


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        settings = ServerSettings.from_run_config(context.run_config)
        run_federation(grid, settings)
    except UserError as exc:
        log(ERROR, "ortft: %s%s", exc.message, f" (what to do: {exc.hint})" if exc.hint else "")
        raise
