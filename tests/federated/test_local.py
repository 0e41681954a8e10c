"""End to end on loopback: `ortft federate local` with 3 SuperNodes on non-IID shards, then export the run."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("flwr")
pytest.importorskip("psutil")

from helpers.bundles import tiny_bundle
from helpers.cli import ok, run_ortft
from helpers.federated import FAST_FED, KINDS, ListenWatcher, federation_pids, shard_args, write_shards

ROUNDS = 3


@pytest.fixture(scope="module")
def federated_run(tmp_path_factory, tiny_llama):
    bundle = tiny_bundle(tmp_path_factory, tiny_llama, "llama-fed")
    work = tmp_path_factory.mktemp("federated")
    shards = write_shards(work / "shards")
    out = work / "run"
    watcher = ListenWatcher()
    watcher.start()
    started = time.perf_counter()
    try:
        result = run_ortft("federate", "local", bundle, *shard_args(shards), "--rounds", ROUNDS, "--local-steps", 6,
                           *FAST_FED, "--round-timeout", 120, "--out", out, timeout=300)
    finally:
        watcher.stop()
    seconds = time.perf_counter() - started
    ok(result)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return {"bundle": bundle, "out": out, "records": records, "watcher": watcher, "seconds": seconds, "stderr": result.stderr}


def test_global_adapter_beats_the_base_on_every_shard(federated_run):
    records = federated_run["records"]
    base = next(r for r in records if r["round"] == 0)
    last = next(r for r in records if r["round"] == ROUNDS)
    assert set(base["eval_loss_per_client"]) == set(KINDS)
    assert set(last["eval_loss_per_client"]) == set(KINDS)
    for kind in KINDS:
        assert last["eval_loss_per_client"][kind]["eval_loss"] < base["eval_loss_per_client"][kind]["eval_loss"], kind
    assert last["eval_loss"] < base["eval_loss"]
    assert [r["round"] for r in records if r["event"] == "round"] == list(range(1, ROUNDS + 1))
    assert all(r["nodes_trained"] == 3 and not r["train_failures"] for r in records if r["event"] == "round")
    assert federated_run["seconds"] < 180, federated_run["seconds"]


def test_bytes_per_round_are_the_adapters_not_the_models(federated_run):
    from safetensors.numpy import load_file

    out = federated_run["out"]
    adapter = load_file(str(out / "adapter.safetensors"))
    adapter_size = sum(v.nbytes for v in adapter.values())
    for record in (r for r in federated_run["records"] if r["event"] == "round"):
        assert record["adapter_bytes"] == adapter_size
        assert record["adapter_bytes_sent"] == adapter_size * record["nodes_sampled"]
        assert record["adapter_bytes_received"] == adapter_size * record["nodes_trained"]
        per_node = record["bytes_sent"] / record["nodes_sampled"]
        # Flower ships content-addressed objects: the adapter plus framing (a B=0 adapter dedups below its size)
        assert per_node < adapter_size * 1.6 + 4096, (per_node, adapter_size)
        assert record["bytes_received"] / record["nodes_trained"] < adapter_size * 1.6 + 4096
        assert record["base_model_bytes"] > adapter_size
        assert record["bytes_sent_vs_base_model"] == pytest.approx(record["bytes_sent"] / record["base_model_bytes"])
    later = [r for r in federated_run["records"] if r["event"] == "round" and r["round"] > 1]
    assert all(r["bytes_sent"] / r["nodes_sampled"] > adapter_size for r in later)  # trained adapters: the full size travels


def test_every_process_listens_on_loopback_only_and_installs_nothing(federated_run):
    watcher = federated_run["watcher"]
    assert watcher.listening, "the watcher saw no listening socket"
    assert {ip for ip, _port, _cmd in watcher.listening} == {"127.0.0.1"}, watcher.listening
    superlinks = [cmd for cmd in watcher.cmdlines if "flower-superlink" in cmd]
    assert superlinks and all("--disable-runtime-dependency-installation" in cmd for cmd in superlinks)
    assert not any("--allow-runtime-dependency-installation" in cmd for cmd in watcher.cmdlines)
    assert not federation_pids(), "processes of the federation outlived it"


def test_federated_run_exports_like_a_training_run(federated_run, tmp_path):
    out = federated_run["out"]
    run_info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run_info["kind"] == "federated" and run_info["bundle_manifest_sha256"]
    assert (out / "checkpoints" / f"step-{ROUNDS:08d}" / "adapter.safetensors").exists()
    ok(run_ortft("export", out, "--out", tmp_path / "peft", "--format", "peft"))
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    ok(run_ortft("export", out, "--out", tmp_path / "merged", "--format", "merged-onnx"))
    assert (tmp_path / "merged" / "model.onnx").is_file()
    # and `ortft eval` reads its round checkpoint (the ORT checkpoint holds the global adapter)
    shard_valid = out.parent / "shards" / "math-valid.jsonl"
    result = ok(run_ortft("eval", out, "--data", shard_valid, "--batch-size", 4, "--seq-len", 128, "--json"))
    loss = json.loads(result.stdout)["loss"]
    last = next(r for r in federated_run["records"] if r["round"] == ROUNDS)
    assert loss == pytest.approx(last["eval_loss_per_client"]["math"]["eval_loss"], rel=1e-4)


def test_marked_processes_finds_a_federation_by_marker_and_role():
    """The /proc scan behind `stop_marked` (and the tests' federation_pids): a given marker, or any (None); a role."""
    import os
    import subprocess
    import sys

    from ortft.federated.local import MARKER, ROLE, marked_processes

    env = dict(os.environ, **{MARKER: "test-marker", ROLE: "supernode-a"})
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    try:
        assert child.pid in marked_processes("test-marker") and child.pid in marked_processes(None)
        assert child.pid in marked_processes("test-marker", "supernode-a") and child.pid in federation_pids("supernode-a")
        assert child.pid in federation_pids()
        assert child.pid not in marked_processes("another-marker") and child.pid not in marked_processes(None, "superlink")
        assert child.pid not in federation_pids("supernode-b")
    finally:
        child.kill()
        child.wait()
