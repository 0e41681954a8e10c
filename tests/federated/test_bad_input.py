"""Bad input fails that node with ortft's own user error, never the federation."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("flwr")

from helpers.bundles import tiny_bundle
from helpers.cli import ok, run_ortft
from helpers.federated import FAST_FED, write_shards


def test_other_bundle_and_bad_shards_fail_only_their_nodes(tmp_path_factory, tiny_llama):
    bundle = tiny_bundle(tmp_path_factory, tiny_llama, "llama-fed")
    other = tiny_bundle(tmp_path_factory, tiny_llama, "llama-fed-rank8", rank=8, alpha=16)
    work = tmp_path_factory.mktemp("federated-bad")
    shards = write_shards(work / "shards")
    malformed = work / "malformed.jsonl"
    malformed.write_text('{"text": "fine"}\n{not json\n', encoding="utf-8")
    missing = work / "missing.jsonl"
    out = work / "run"
    from ortft.federated.local import LocalSettings, run_local

    good_train, good_valid = shards["math"]
    settings = LocalSettings(
        bundle=str(bundle), out=str(out), threads=1, min_nodes=4,
        shards=[str(good_train), str(shards["words"][0]), str(malformed), str(missing)],
        valid=[str(good_valid), str(shards["words"][1]), str(good_valid), str(good_valid)],
        node_bundles=[str(bundle), str(other), str(bundle), str(bundle)],
        run_config={"rounds": 1, "local-steps": 2, "lr": 3e-3, "batch-size": 4, "seq-len": 128, "round-timeout": 120.0},
    )
    run_local(settings, echo=lambda _line: None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    last = records[-1]
    assert last["round"] == 1 and last["nodes_trained"] == 1
    failures = {f["node"]: f["reason"] for f in last["train_failures"]}
    # the server names the node and says why (the node's own words)
    assert "differs from the server's" in failures["words"] and "manifest sha256" in failures["words"]
    assert "line 2" in failures["malformed"] and "malformed.jsonl" in failures["malformed"]
    assert "missing.jsonl" in failures["missing"]
    assert "Traceback" not in "".join(failures.values())
    # ... and so does the node itself, in its own log
    logs = out / "logs"
    assert "differs from the server's" in (logs / "supernode-words.log").read_text(encoding="utf-8", errors="replace")
    assert "line 2" in (logs / "supernode-malformed.log").read_text(encoding="utf-8", errors="replace")
    assert "differs from the server's" in (logs / "flwr-run.log").read_text(encoding="utf-8", errors="replace")
    ok(run_ortft("export", out, "--out", work / "export", "--format", "adapter"))


def test_cli_refuses_mismatched_valid_lists(tmp_path):
    for name in ("a.jsonl", "b.jsonl", "v.jsonl"):  # files that exist: --shard and --valid must name existing files
        (tmp_path / name).write_text('{"text": "hello"}\n', encoding="utf-8")
    result = run_ortft("federate", "local", tmp_path, "--shard", tmp_path / "a.jsonl", "--shard", tmp_path / "b.jsonl",
                       "--valid", tmp_path / "v.jsonl", "--out", tmp_path / "run", *FAST_FED)
    assert result.returncode == 2 and "one --valid per --shard" in result.stderr and "Traceback" not in result.stderr


def test_cli_refuses_a_missing_shard_and_fits_the_default_seq_len_to_the_bundle(tmp_path_factory, tiny_llama, monkeypatch, capsys):
    from ortft.cli import main
    from ortft.federated import local

    bundle = tiny_bundle(tmp_path_factory, tiny_llama, "llama-fed")  # max_seq_len 256
    shard = tmp_path_factory.mktemp("fed-cli") / "a.jsonl"
    shard.write_text('{"text": "hello"}\n', encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(["federate", "local", str(bundle), "--shard", str(shard.parent / "missing.jsonl"), "--out", str(shard.parent / "run")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: --shard " + str(shard.parent / "missing.jsonl") + " does not exist")
    seen = []
    monkeypatch.setattr(local, "run_local", lambda settings, echo: seen.append(settings) or {"round": 0})
    main(["federate", "local", str(bundle), "--shard", str(shard), "--out", str(shard.parent / "run")])
    main(["federate", "local", str(bundle), "--shard", str(shard), "--out", str(shard.parent / "run"), "--seq-len", "64"])
    assert [settings.run_config["seq-len"] for settings in seen] == [256, 64]
