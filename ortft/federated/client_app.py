"""The Flower ClientApp: a device trains the global adapter on its own data with ortft's training loop.

Node configuration (`flower-supernode --node-config ...`, a TOML file or key=value pairs):
  bundle          the ortft bundle on this device (must be the server's: same manifest sha256)
  data            this device's training data (JSONL)
  valid           its validation data (JSONL), or
  valid-fraction  a fraction of `data` held out for validation (default: none; then evaluation
                  uses the training data)
  local-steps     optimizer steps per round (default: the server's `local-steps`)
  name            a name for this node in the server's metrics (default: the data file's stem)
  threads         ORT threads (default: physical cores)

Device side: flwr, numpy, ORT's training API; no torch, no transformers. A user error (bad data,
a different bundle) fails this node's reply with a clear message; the federation goes on.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from logging import ERROR, INFO
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore import (
    log,  # Flower's logger: its lines reach the SuperNode's / `flwr run --stream` output
)

from .. import run as runs
from ..adapter import adapter_bytes, load_adapter
from ..errors import UserError
from ..manifest import manifest_digest
from .aggregate import to_array_record

ORTFT_ERROR_CODE = 2  # Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION: the reason carries ortft's message

app = ClientApp()


class BundleMismatch(UserError):
    """The node's bundle is not the server's."""


@dataclass
class NodeSettings:
    bundle: Path
    data: str
    valid: str | None
    valid_fraction: float | None
    local_steps: int | None
    name: str
    threads: int | None

    @classmethod
    def from_context(cls, context: Context) -> NodeSettings:
        config = dict(context.node_config)
        from ..errors import ConfigError

        missing = [key for key in ("bundle", "data") if not str(config.get(key, "")).strip()]
        if missing:
            raise ConfigError(f"this SuperNode's --node-config lacks {', '.join(missing)}",
                              hint='start it with --node-config \'bundle="/path/bundle" data="/path/train.jsonl"\'')
        fraction = config.get("valid-fraction")
        steps = config.get("local-steps")
        threads = config.get("threads")
        return cls(
            bundle=Path(str(config["bundle"])),
            data=str(config["data"]),
            valid=str(config["valid"]) if str(config.get("valid", "")).strip() else None,
            valid_fraction=float(fraction) if fraction not in (None, "", 0, 0.0) else None,
            local_steps=int(steps) if steps not in (None, "", 0) else None,
            name=str(config.get("name") or Path(str(config["data"])).stem),
            threads=int(threads) if threads not in (None, "", 0) else None,
        )


def _error_reply(msg: Message, node: str, exc: UserError) -> Message:
    reason = f"ortft: node {node} refused: {exc.message}" + (f" (what to do: {exc.hint})" if exc.hint else "")
    log(ERROR, "%s", reason)
    return Message(Error(code=ORTFT_ERROR_CODE, reason=reason), reply_to=msg)


def check_bundle(settings: NodeSettings, server_digest: str) -> dict:
    """Refuse to work on a bundle other than the server's (the adapter would not fit, or mean something else);
    returns its manifest."""
    from ..manifest import read_manifest

    manifest = read_manifest(settings.bundle)
    mine = manifest_digest(settings.bundle)
    if server_digest and mine != server_digest:
        raise BundleMismatch(
            f"this node's bundle {settings.bundle} differs from the server's "
            f"(manifest sha256 {mine[:12]}... here, {server_digest[:12]}... on the server)",
            hint="give this SuperNode a copy of the server's bundle (node-config bundle=...)",
        )
    return manifest


def global_adapter_of(msg: Message, manifest: dict) -> dict[str, np.ndarray]:
    """The server's global adapter: exactly the bundle's trainable tensors, float32, their shapes, finite;
    anything else is refused (the server is not trusted more than a node is)."""
    from ..bundle import BundleManifest
    from ..errors import RunError
    from .reply_checks import read_arrays

    record = msg.content.array_records.get("arrays") if msg.has_content() else None
    if record is None:
        raise RunError("the server's message carries no global adapter ('arrays')", hint="check the server's ortft version")
    adapter, problem = read_arrays(record, BundleManifest.of(manifest).trainable_shapes)
    if problem:
        raise RunError(f"the global adapter from the server does not fit this node's bundle: {problem}",
                       hint="the server and this node must use the same bundle and ortft version")
    return adapter


def _setting(config: ConfigRecord, name: str):
    """A federation setting from the server's request (run-config key with dashes), else FederationConfig's default."""
    from ..config import FederationConfig, default_of

    default = default_of(FederationConfig, name)
    return type(default)(config.get(name.replace("_", "-"), default))


def _train_config(settings: NodeSettings, config: ConfigRecord, out: Path, init_adapter: Path):
    from ..config import TrainConfig

    steps = settings.local_steps or _setting(config, "local_steps")
    rnd = int(config.get("server-round", 1))
    return TrainConfig(
        bundle=str(settings.bundle), data=settings.data, out=str(out),
        valid=None, valid_fraction=settings.valid_fraction,
        steps=steps, batch_size=_setting(config, "batch_size"), seq_len=_setting(config, "seq_len"),
        lr=_setting(config, "lr"), schedule=_setting(config, "schedule"), warmup=_setting(config, "warmup"),
        eval_every=10**9, save_every=10**9, keep=1, max_eval_batches=1,
        seed=_setting(config, "seed") + rnd, threads=settings.threads, init_adapter=str(init_adapter),
    )


def _proximal_hook(global_adapter: dict[str, np.ndarray], mu: float):
    """FedProx's proximal term mu/2 ||w - w_global||^2, applied decoupled after each optimizer step
    (w -= lr * mu * (w - w_global)): the ORT training graph's loss is fixed, so the pull is a separate step."""
    if mu <= 0:
        return None

    def pull(session, _step, lr):
        for name, target in global_adapter.items():
            current = np.asarray(session.parameter(name), dtype=np.float32)
            session.set_parameter(name, np.ascontiguousarray(current - np.float32(lr * mu) * (current - target)))

    return pull


def _fallback_name(context: Context) -> str:
    """What to call this node in an error reply when its settings cannot even be read."""
    return str(context.node_config.get("name") or context.node_config.get("data") or context.node_id)


def _checked_config(msg: Message, settings: NodeSettings) -> tuple[ConfigRecord, dict]:
    """The request's config and the bundle's manifest, after checking that the server trains the bundle this node holds."""
    config = msg.content["config"]
    return config, check_bundle(settings, str(config.get("bundle-sha256", "")))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter for `local-steps` on this node's data; reply with the new adapter."""
    from ..train import train as train_loop

    node = _fallback_name(context)
    try:
        settings = NodeSettings.from_context(context)
        node = settings.name
        config, manifest = _checked_config(msg, settings)
        global_adapter = global_adapter_of(msg, manifest)
        with tempfile.TemporaryDirectory(prefix="ortft-federated-") as tmp:
            init = Path(tmp) / "global.safetensors"
            init.write_bytes(adapter_bytes(global_adapter))
            train_config = _train_config(settings, config, Path(tmp) / "run", init)
            started = time.perf_counter()
            summary = train_loop(train_config, quiet=True,
                                 on_step=_proximal_hook(global_adapter, float(config.get("proximal-mu", 0.0))))
            local = load_adapter(Path(tmp) / "run" / runs.ADAPTER_FILE)
        local = {name: local[name] for name in global_adapter}  # the server's order
    except UserError as exc:
        return _error_reply(msg, node, exc)
    metrics = MetricRecord({
        "num-examples": int(summary["data"]["num_examples"]),
        "train-loss": float(summary["final_train_loss"]),
        "train-seconds": float(time.perf_counter() - started),
        "local-steps": int(summary["step"]),
    })
    content = RecordDict({"arrays": to_array_record(local), "metrics": metrics, "node": ConfigRecord({"name": node})})
    log(INFO, "node %s trained %d steps: loss %.4f", node, summary["step"], summary["final_train_loss"])
    return Message(content=content, reply_to=msg)


_eval_cache: dict = {}


def _eval_setup(settings: NodeSettings, config: ConfigRecord):
    """(session, manifest, dataset, data config), cached per bundle/data/settings within this process."""
    from ..config import TrainConfig
    from ..data import DataConfig, load_train_and_valid
    from ..runtime import TrainingSession
    from ..tokenizer import load_tokenizer
    from ..validate import require_valid

    key = (str(settings.bundle), settings.data, settings.valid, settings.valid_fraction,
           _setting(config, "batch_size"), _setting(config, "seq_len"), _setting(config, "seed"))
    if key not in _eval_cache:
        manifest = require_valid(settings.bundle)
        tokenizer = load_tokenizer(manifest.tokenizer_path(settings.bundle))
        train_config = TrainConfig(batch_size=key[4], seq_len=key[5], seed=key[6])
        data_config = DataConfig.from_train_config(train_config, task=manifest.task, label_names=manifest.labels)
        train_set, valid_set = load_train_and_valid(settings.data, tokenizer, data_config, settings.valid, settings.valid_fraction)
        session = TrainingSession(settings.bundle, threads=settings.threads, with_optimizer=False, manifest=manifest)
        _eval_cache.clear()
        _eval_cache[key] = (session, manifest, valid_set if valid_set is not None else train_set, data_config)
    return _eval_cache[key]


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Validation loss of the received global adapter on this node's validation data."""
    from ..evaluate import evaluate as evaluate_loop

    node = _fallback_name(context)
    try:
        settings = NodeSettings.from_context(context)
        node = settings.name
        config, _manifest = _checked_config(msg, settings)
        session, manifest, dataset, data_config = _eval_setup(settings, config)
        adapter = global_adapter_of(msg, manifest)
        for name in manifest.trainable_names:
            session.set_parameter(name, adapter[name])
        result = evaluate_loop(session, dataset, data_config, manifest.task)
    except UserError as exc:
        return _error_reply(msg, node, exc)
    metrics = MetricRecord({"num-examples": int(result.examples), "eval-loss": float(result.loss), "eval-tokens": int(result.tokens)})
    return Message(content=RecordDict({"metrics": metrics, "node": ConfigRecord({"name": node})}), reply_to=msg)
