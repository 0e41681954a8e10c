"""Faults on loopback: a SuperNode killed in the middle of a round, and the server killed between rounds.

Timing (Flower 1.42): a SuperNode heartbeats every 17.5-22.5 s and the SuperLink marks it offline when none
came for 2 x 30 s, so a SIGKILLed node is reported unavailable ("Node Unavailable") 37.5-60 s after it died
(measured here: round 1's record 52-61 s after the kill); the ServerApp polls for replies every 3 s.
ROUND_TIMEOUT lies above that, and far above what a healthy node needs for a round of these tiny runs (a
few seconds), so a round waits for Flower's verdict on the dead node and never gives up on a live one:
each test takes 1-3 minutes, so both are marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

pytest.importorskip("flwr")

from helpers.bundles import tiny_bundle
from helpers.cli import ok, ortft_command, run_ortft
from helpers.federated import FAST_FED, KINDS, federation_pids, shard_args, wait_for, write_shards
from helpers.paths import ROOT

pytestmark = pytest.mark.slow  # 1-3 minutes each; ./scripts/test.sh runs them, -m "not slow" leaves them out

ROUND_TIMEOUT = 90.0  # > the 60 s after which Flower reports a dead node unavailable
NODE_ONLY = {"rounds": 2, "local-steps": 2, "lr": 3e-3, "batch-size": 4, "seq-len": 128, "round-timeout": ROUND_TIMEOUT}


def rounds_of(out) -> list[dict]:
    from ortft.federated.runfolder import read_rounds

    return read_rounds(out)


def test_node_killed_mid_round_is_left_out_and_rejoins(tmp_path_factory, tiny_llama):
    from ortft.federated.appdir import write_app
    from ortft.federated.local import (
        LocalCluster,
        LocalSettings,
        node_configs,
        server_run_config,
    )

    bundle = tiny_bundle(tmp_path_factory, tiny_llama, "llama-fed")
    work = tmp_path_factory.mktemp("federated-node-killed")
    shards = write_shards(work / "shards")
    out = work / "run"
    settings = LocalSettings(bundle=str(bundle), out=str(out), threads=1, min_nodes=2,
                             shards=[str(train) for train, _ in shards.values()],
                             valid=[str(valid) for _, valid in shards.values()], run_config=dict(NODE_ONLY))
    started = time.monotonic()
    with LocalCluster.create(out / "logs") as cluster:
        app_dir = write_app(cluster.work / "app")
        cluster.start_superlink()
        nodes = {name: cluster.add_node(name, config) for name, config in node_configs(settings)}
        for node in nodes.values():
            cluster.start_node(node)
        run = cluster.run_app(app_dir, server_run_config(settings))
        victim = nodes["facts"]

        def training_round_1() -> bool:  # round 0 (evaluation only) is done and the victim got round 1's adapter
            return (any(r["round"] == 0 for r in rounds_of(out))
                    and "Receiving: train message" in victim.log_path.read_text(encoding="utf-8", errors="replace"))

        wait_for(training_round_1, 120, "the victim receives round 1's train message", run)
        cluster.kill_node(victim)  # SIGKILL: the SuperNode, its superexec helper and its ClientApp
        killed = time.monotonic()
        assert not federation_pids(f"supernode-{victim.name}")
        assert not any(r["round"] >= 1 for r in rounds_of(out)), "round 1 ended before the kill"
        # The device comes back at once, as a new SuperNode (a new node id): round 1 was sent to the old one.
        cluster.start_node(victim)
        wait_for(lambda: any(r["round"] == 1 for r in rounds_of(out)), 150, "round 1 completes without the victim", run)
        round_1_after = time.monotonic() - killed
        run.wait(timeout=180)
        assert run.returncode == 0, (out / "logs" / "flwr-run.log").read_text(encoding="utf-8", errors="replace")[-3000:]
    seconds = time.monotonic() - started
    print(f"\nnode fault: round 1 completed {round_1_after:.1f} s after the kill; whole run {seconds:.1f} s")

    records = rounds_of(out)
    assert [(r["round"], r["event"]) for r in records] == [(0, "base"), (1, "round"), (2, "round")]
    base, first, second = records
    assert set(base["eval_loss_per_client"]) == set(KINDS)
    # round 1: sent to all three, aggregated from the two that replied; the dead node is named, once, with why
    assert first["nodes_sampled"] == 3 and first["nodes_trained"] == 2
    assert set(first["train_loss_per_client"]) == {"math", "words"}
    assert [f["node"] for f in first["train_failures"]] == ["facts"], first["train_failures"]
    reason = first["train_failures"][0]["reason"]
    assert "Node Unavailable" in reason or "round-timeout" in reason, reason
    assert first["eval_loss"] is not None
    # round 2: the restarted node trains again, and every node evaluates the global adapter
    assert second["nodes_sampled"] == 3 and second["nodes_trained"] == 3 and not second["train_failures"]
    assert set(second["train_loss_per_client"]) == set(KINDS)
    assert set(second["eval_loss_per_client"]) == set(KINDS)
    assert second["adapter_in_sha256"] == first["adapter_sha256"]
    assert (out / "checkpoints" / "step-00000002" / "adapter.safetensors").is_file()
    assert not federation_pids(), "processes of the federation outlived it"
    assert seconds < 240, seconds


def test_server_killed_between_rounds_resumes_from_the_last_saved_round(tmp_path_factory, tiny_llama):
    from ortft import run as runs
    from ortft.adapter import load_adapter
    from ortft.federated.aggregate import adapter_sha256

    bundle = tiny_bundle(tmp_path_factory, tiny_llama, "llama-fed")
    work = tmp_path_factory.mktemp("federated-server-killed")
    shards = write_shards(work / "shards")
    out = work / "run"
    args = ["federate", "local", bundle, *shard_args(shards), "--rounds", 2, "--local-steps", 2, *FAST_FED,
            "--round-timeout", ROUND_TIMEOUT, "--out", out]
    started = time.monotonic()
    first = subprocess.Popen(ortft_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
    saved = out / "checkpoints" / "step-00000001"
    try:
        wait_for(lambda: any(r["round"] == 1 for r in rounds_of(out)) and saved.is_dir() and runs.checkpoint_problem(saved) is None,
                 150, "round 1 is saved", first)
        # The server side: the SuperLink, its superexec helper and the ServerApp (now sending round 2).
        server = federation_pids("superlink")
        assert len(server) >= 2, server
        for pid in server:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _stdout, stderr = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    first_seconds = time.monotonic() - started
    assert first.returncode == 2, stderr
    assert "stopped after round 1 of 2" in stderr and "--resume" in stderr and "Traceback" not in stderr, stderr
    assert [r["round"] for r in rounds_of(out)] == [0, 1]
    assert not federation_pids(), "processes of the killed federation outlived it"
    saved_adapter = adapter_sha256(load_adapter(saved / runs.ADAPTER_FILE))

    resumed = time.monotonic()
    ok(run_ortft(*args, "--resume", timeout=200))
    seconds = time.monotonic() - started
    print(f"\nserver fault: first run {first_seconds:.1f} s (killed after round 1), resumed run "
          f"{time.monotonic() - resumed:.1f} s, whole test {seconds:.1f} s")

    records = rounds_of(out)
    # every round once: round 0 and 1 from the first run, round 2 from the resumed one (no round 0 again)
    assert [(r["round"], r["event"]) for r in records] == [(0, "base"), (1, "round"), (2, "round")]
    base, first_round, second_round = records
    # the chain of global adapters: round 2 started from round 1's saved adapter, not from the bundle's
    assert first_round["adapter_in_sha256"] == base["adapter_sha256"]
    assert first_round["adapter_sha256"] == saved_adapter
    assert second_round["adapter_in_sha256"] == saved_adapter != base["adapter_sha256"]
    assert second_round["adapter_sha256"] == adapter_sha256(load_adapter(out / runs.ADAPTER_FILE))
    assert second_round["nodes_trained"] == 3 and set(second_round["eval_loss_per_client"]) == set(KINDS)
    log = (out / "logs" / "flwr-run.log").read_text(encoding="utf-8", errors="replace")
    assert f"after round 1 (global adapter sha256 {saved_adapter[:12]})" in log
    assert log.count("round 0 (the bundle's adapter)") == 1  # the base was not evaluated again
    state = json.loads((out / "checkpoints" / "step-00000002" / runs.STATE_FILE).read_text(encoding="utf-8"))
    assert state["round"] == 2
    assert not federation_pids()
    assert seconds < 300, seconds
