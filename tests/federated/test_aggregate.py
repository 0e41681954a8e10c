"""FedAvg over adapters: the example-weighted mean, exactly; what an adapter costs on the wire."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from ortft.adapter import load_adapter
from ortft.federated.aggregate import (
    adapter_sha256,
    from_array_record,
    payload_bytes,
    to_array_record,
    weighted_mean,
    wire_bytes,
)
from ortft.federated.server_app import ServerSettings, make_strategy


def client_reply(adapter: dict[str, np.ndarray], examples: int) -> RecordDict:
    """What a ClientApp's train reply carries: the adapter, its metrics (num-examples), its name."""
    return RecordDict({"arrays": to_array_record(adapter), "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0}),
                       "node": ConfigRecord({"name": "x"})})


def adapters(seed: int, count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    names = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    return [{names[0]: rng.standard_normal((4, 64)).astype(np.float32), names[1]: rng.standard_normal((64, 4)).astype(np.float32)}
            for _ in range(count)]


def test_fedavg_of_adapters_is_the_example_weighted_mean_exactly():
    clients = adapters(0, 3)
    examples = [10, 30, 24]
    # Flower's FedAvg aggregation (what FedAvg.aggregate_train calls on the replies' contents)
    aggregated = from_array_record(aggregate_arrayrecords([client_reply(a, n) for a, n in zip(clients, examples)], "num-examples"))
    ours = weighted_mean(clients, examples)
    total = sum(examples)
    for name in clients[0]:
        # bit for bit: sum_i (n_i / N) * adapter_i, accumulated in float32 in client order
        expected = np.float32(0)
        for adapter, n in zip(clients, examples):
            expected = expected + adapter[name] * (n / total)
        assert np.array_equal(aggregated[name], expected), name
        assert np.array_equal(aggregated[name], ours[name]), name
        # and the mathematical weighted mean, to float32 rounding
        exact = np.average(np.stack([a[name].astype(np.float64) for a in clients]), axis=0, weights=examples)
        np.testing.assert_allclose(aggregated[name], exact, rtol=1e-6, atol=1e-6)


def test_fedavg_is_exact_when_the_arithmetic_is():
    # Dyadic weights (1/8, 2/8, 5/8) and values in steps of 1/8: float32 represents every step exactly.
    name = "w"
    clients = [{name: np.full((3, 5), value, dtype=np.float32)} for value in (1.0, 2.0, 3.0)]
    aggregated = from_array_record(aggregate_arrayrecords([client_reply(a, n) for a, n in zip(clients, [1, 2, 5])], "num-examples"))
    assert np.array_equal(aggregated[name], np.full((3, 5), (1 * 1 + 2 * 2 + 3 * 5) / 8, dtype=np.float32))


def test_only_the_adapter_travels_and_bytes_are_its_size_plus_framing():
    adapter = adapters(1, 1)[0]
    record = to_array_record(adapter)
    raw = sum(value.nbytes for value in adapter.values())
    assert payload_bytes(record) == raw
    on_wire = wire_bytes(record)
    assert raw < on_wire < raw + 2048  # framing: names, shapes, dtypes, object headers
    assert set(from_array_record(record)) == set(adapter)


def test_strategies_are_flowers_own():
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

    base = {"bundle": "b", "out": "o"}
    assert type(make_strategy(ServerSettings.from_run_config(base))) is FedAvg
    assert isinstance(make_strategy(ServerSettings.from_run_config({**base, "strategy": "fedprox", "proximal-mu": 0.1})), FedProx)
    assert isinstance(make_strategy(ServerSettings.from_run_config({**base, "strategy": "fedadam"})), FedAdam)
    from ortft.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown"):
        ServerSettings.from_run_config({**base, "strategy": "fedsgd"})


def test_adapter_sha256_follows_the_numbers_not_the_container(tmp_path):
    from ortft import run as runs

    adapter = adapters(7, 1)[0]
    digest = adapter_sha256(adapter)
    assert adapter_sha256(dict(reversed(list(adapter.items())))) == digest  # order of the dict
    assert adapter_sha256(from_array_record(to_array_record(adapter))) == digest  # through Flower
    (tmp_path / "a.safetensors").write_bytes(runs.adapter_bytes(adapter))
    assert adapter_sha256(load_adapter(tmp_path / "a.safetensors")) == digest  # through a checkpoint file
    changed = {name: value.copy() for name, value in adapter.items()}
    name = next(iter(changed))
    changed[name].flat[0] += 1e-6
    assert adapter_sha256(changed) != digest
