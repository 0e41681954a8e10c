"""Hostile federated replies (issue 21): the ServerApp checks every reply before it aggregates it.

The ServerApp runs in this process against a stand-in for Flower's Grid whose nodes answer with whatever a
test gives them (two honest nodes and one attacker), so each attack of the issue is repeated exactly: the
bad reply is recorded as that node's failure, the round goes on with the others, the saved global adapter
is the honest nodes' mean, and nothing crashes. Also: the robust strategies and DP clipping from Flower,
and a node that refuses a global adapter with extra tensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity
from helpers.bundles import tiny_bundle
from helpers.data import write_text_data

from ortft.adapter import load_adapter
from ortft import run as runs
from ortft.federated import client_app
from ortft.federated.aggregate import weighted_mean
from ortft.federated.server_app import ServerSettings, make_strategy, run_federation
from ortft.initial_adapter import initial_parameters
from ortft.manifest import manifest_digest, read_manifest

HONEST_STEP = 1e-4  # what an honest node adds to every adapter element (node 1) or twice that (node 2)
HONEST_EXAMPLES = {1: 10, 2: 30}
ATTACKER = 3


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_llama) -> Path:
    return tiny_bundle(tmp_path_factory, tiny_llama, "llama-fed")


@pytest.fixture(autouse=True)
def task_identity():
    """Flower's Message needs the identity of the task it runs in; the ServerApp process would set it."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class FakeGrid:
    """Flower's Grid as the ServerApp uses it: node ids, and send_and_receive answered by `answer(node, message)`."""

    def __init__(self, answers: dict):
        self.answers = answers  # node id -> function(message) -> RecordDict (the reply's content)
        self.sent = 0

    def get_node_ids(self):
        return sorted(self.answers)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            self.sent += 1
            message.metadata._message_id = f"message-{self.sent}"
            content = self.answers[message.metadata.dst_node_id](message)
            replies.append(Message(content, reply_to=message))
        return replies


def honest(node: int):
    def answer(message):
        if message.metadata.message_type == "evaluate":
            return RecordDict({"metrics": MetricRecord({"eval-loss": 3.0, "eval-tokens": 100, "num-examples": 5}),
                               "node": ConfigRecord({"name": f"honest-{node}"})})
        adapter = {name: array.numpy() + np.float32(HONEST_STEP * node) for name, array in message.content["arrays"].items()}
        return train_reply(adapter, HONEST_EXAMPLES[node], f"honest-{node}")
    return answer


def train_reply(adapter: dict, examples, name: str, loss=2.0) -> RecordDict:
    arrays = ArrayRecord({key: Array(np.asarray(value)) for key, value in adapter.items()})
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": examples, "train-loss": loss}),
                       "node": ConfigRecord({"name": name})})


def attacker(change, eval_loss: float = 3.0):
    """A node whose training reply is the honest one changed by `change(adapter, metrics) -> (adapter, metrics)`."""
    def answer(message):
        if message.metadata.message_type == "evaluate":
            return RecordDict({"metrics": MetricRecord({"eval-loss": eval_loss, "eval-tokens": 10**6, "num-examples": 5}),
                               "node": ConfigRecord({"name": "attacker"})})
        adapter = {name: array.numpy() + np.float32(HONEST_STEP) for name, array in message.content["arrays"].items()}
        adapter, metrics = change(adapter, {"num-examples": 10, "train-loss": 2.0})
        return RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in adapter.items()}),
                           "metrics": MetricRecord(metrics), "node": ConfigRecord({"name": "attacker"})})
    return answer


def settings_for(bundle: Path, out: Path, **extra) -> ServerSettings:
    values = {"bundle": str(bundle), "out": str(out), "rounds": 1, "min_nodes": 3, "local_steps": 2, "lr": 1e-3, "round_timeout": 5.0}
    values.update(extra)
    settings = ServerSettings(**values)
    settings.check()
    return settings


def _first(adapter: dict) -> str:
    return min(adapter)


def _replace_first(value):
    def change(adapter, metrics):
        adapter[_first(adapter)] = value(adapter[_first(adapter)])
        return adapter, metrics
    return change


def _with_metric(key, value):
    def change(adapter, metrics):
        return adapter, {**metrics, key: value}
    return change


ATTACKS = {
    "nan": _replace_first(lambda a: np.full_like(a, np.nan)),
    "inf": _replace_first(lambda a: np.full_like(a, np.inf)),
    "1e30": _replace_first(lambda a: np.full_like(a, 1e30)),
    "broadcast (1,1)": _replace_first(lambda a: np.full((1, 1), 0.5, np.float32)),
    "wrong shape": _replace_first(lambda a: np.zeros((a.shape[0] + 1,) + a.shape[1:], np.float32)),
    "float64": _replace_first(lambda a: a.astype(np.float64)),
    "missing key": lambda adapter, metrics: ({k: v for k, v in adapter.items() if k != _first(adapter)}, metrics),
    "extra key": lambda adapter, metrics: ({**adapter, "evil": np.ones(3, np.float32)}, metrics),
    "num-examples 1e12": _with_metric("num-examples", 10**12),
    "num-examples negative": _with_metric("num-examples", -5),
    "num-examples inf": _with_metric("num-examples", math.inf),
    "num-examples float": _with_metric("num-examples", 10.5),
    "train-loss nan": _with_metric("train-loss", math.nan),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_bad_training_reply_is_that_nodes_failure_and_the_round_goes_on(bundle, tmp_path, attack):
    grid = FakeGrid({1: honest(1), 2: honest(2), ATTACKER: attacker(ATTACKS[attack])})
    record = run_federation(grid, settings_for(bundle, tmp_path / "run"))
    failures = {failure["node_id"]: failure["reason"] for failure in record["train_failures"]}
    assert list(failures) == [ATTACKER] and failures[ATTACKER].startswith("reply refused:"), failures
    assert record["nodes_trained"] == 2 and record["train_examples"] == sum(HONEST_EXAMPLES.values())
    start = initial_parameters(bundle, read_manifest(bundle))
    expected = weighted_mean([{k: v + np.float32(HONEST_STEP * node) for k, v in start.items()} for node in (1, 2)],
                             [HONEST_EXAMPLES[1], HONEST_EXAMPLES[2]])
    saved = load_adapter(tmp_path / "run" / runs.ADAPTER_FILE)
    for name in start:
        np.testing.assert_allclose(saved[name], expected[name], rtol=0, atol=1e-7)


def test_an_update_beyond_the_norm_bound_is_refused(bundle, tmp_path):
    """Finite but large (every element + 1): above the automatic bound 10 x local-steps x lr x sqrt(parameters)."""
    grid = FakeGrid({1: honest(1), 2: honest(2), ATTACKER: attacker(lambda a, m: ({k: v + 1.0 for k, v in a.items()}, m))})
    record = run_federation(grid, settings_for(bundle, tmp_path / "run"))
    assert [f["node_id"] for f in record["train_failures"]] == [ATTACKER]
    assert "above max-update-norm" in record["train_failures"][0]["reason"]


def test_a_poisoned_evaluation_cannot_make_a_round_the_best(bundle, tmp_path):
    """An eval loss of -1e9 (with a million tokens behind it) is refused; the round's loss is the honest nodes'."""
    grid = FakeGrid({1: honest(1), 2: honest(2), ATTACKER: attacker(lambda a, m: (a, m), eval_loss=-1e9)})
    record = run_federation(grid, settings_for(bundle, tmp_path / "run"))
    assert record["eval_loss"] == pytest.approx(3.0)
    assert [f["node_id"] for f in record["eval_failures"]] == [ATTACKER] and "eval-loss" in record["eval_failures"][0]["reason"]
    assert json.loads((tmp_path / "run" / runs.BEST_FILE).read_text())["eval_loss"] == pytest.approx(3.0)


@pytest.mark.parametrize("strategy, cls", [("fedmedian", "FedMedian"), ("trimmed-mean", "FedTrimmedAvg"), ("krum", "Krum")])
def test_robust_strategies_keep_a_bounded_outlier_out(bundle, tmp_path, strategy, cls):
    """An attacker within every bound (its update is finite and under the norm bound) still cannot pull the
    global adapter with Flower's robust strategies: it ends within the honest nodes' range."""
    assert type(make_strategy(settings_for(bundle, tmp_path, strategy=strategy))).__name__ == cls
    honest_nodes = {node: honest(1 if node % 2 else 2) for node in (1, 2, 4, 5)}
    outlier = attacker(lambda a, m: ({k: v + np.float32(0.002) for k, v in a.items()}, {**m, "num-examples": 1000}))
    grid = FakeGrid({**honest_nodes, ATTACKER: outlier})
    record = run_federation(grid, settings_for(bundle, tmp_path / "run", strategy=strategy, min_nodes=5))
    assert not record["train_failures"]
    start = initial_parameters(bundle, read_manifest(bundle))
    saved = load_adapter(tmp_path / "run" / runs.ADAPTER_FILE)
    for name in start:
        moved = saved[name] - start[name]
        assert moved.max() <= 2 * HONEST_STEP + 1e-7 and moved.min() >= HONEST_STEP - 1e-7, (strategy, name)


def test_dp_clipping_bounds_every_update(bundle, tmp_path):
    """--dp-clip 0.001 (noise 0): Flower's server-side clipping caps each node's update at L2 norm 0.001."""
    settings = settings_for(bundle, tmp_path / "run", dp_clip=0.001, dp_noise=0.0)
    assert type(make_strategy(settings)).__name__ == "DifferentialPrivacyServerSideFixedClipping"
    grid = FakeGrid({1: honest(1), 2: honest(2), ATTACKER: honest(2)})
    run_federation(grid, settings)
    start = initial_parameters(bundle, read_manifest(bundle))
    saved = load_adapter(tmp_path / "run" / runs.ADAPTER_FILE)
    norm = math.sqrt(sum(float(np.sum((saved[k].astype(np.float64) - start[k]) ** 2)) for k in start))
    assert 0 < norm <= 0.001 + 1e-6


def test_the_client_refuses_a_global_adapter_with_extra_tensors(bundle, tmp_path):
    """A server (or anyone posing as one) sending tensors the bundle does not have gets a clean error reply."""
    data = write_text_data(tmp_path / "train.jsonl", 4)
    adapter = initial_parameters(bundle, read_manifest(bundle))
    arrays = ArrayRecord({**{k: Array(v) for k, v in adapter.items()}, "evil": Array(np.ones(3, np.float32))})
    config = ConfigRecord({"bundle-sha256": manifest_digest(bundle), "local-steps": 1, "server-round": 1})
    message = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=7, message_type="train")
    message.metadata._message_id = "m-1"
    context = Context(run_id=1, node_id=7, node_config={"bundle": str(bundle), "data": str(data), "name": "device"},
                      state=RecordDict(), run_config={})
    TaskIdentity.node_id = 7
    reply = client_app.train(message, context)
    assert reply.has_error() and "does not fit this node's bundle" in reply.error.reason and "evil" in reply.error.reason


def test_the_run_configuration_carries_the_new_settings():
    """`federate local` and `flwr run --run-config` pass strategy, DP and bounds as run-config keys (the app's defaults too)."""
    from ortft.errors import ConfigError
    from ortft.federated.appdir import app_pyproject

    settings = ServerSettings.from_run_config({"bundle": "b", "out": "o", "strategy": "trimmed-mean", "trim-beta": 0.3,
                                               "dp-clip": 0.5, "dp-noise": 1.0, "max-update-norm": 2, "max-examples": 100})
    assert (settings.strategy, settings.trim_beta, settings.dp_clip, settings.max_update_norm, settings.max_examples) == \
        ("trimmed-mean", 0.3, 0.5, 2.0, 100)
    for key in ("trim-beta", "krum-malicious-nodes", "dp-clip", "dp-noise", "max-update-norm", "max-examples"):
        assert f"{key} = " in app_pyproject()
    with pytest.raises(ConfigError, match="dp-noise needs dp-clip"):
        ServerSettings.from_run_config({"bundle": "b", "out": "o", "dp-noise": 1.0})
