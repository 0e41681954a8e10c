"""The frozen-prefix cache (ortft/prefix_cache.py): the same losses as the uncached graphs, step for step,
for padded, packed, length-grouped and accumulated batches, evaluation, resume, QLoRA and a spilled cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ortft.config import TrainConfig
from ortft.prefix_cache import SPILL_PREFIX, HiddenStateStore, batch_row_keys, budget_bytes
from ortft.train import train
from helpers.bundles import tiny_bundle
from helpers.runs import read_metrics

RELATIVE = 1e-4
_WORDS = ["Paris", "France", "hello", "world", "capital", "answer", "six", "seven", "river", "mountain"]


@pytest.fixture(scope="module")
def four_layers(tiny_model_factory) -> Path:
    return tiny_model_factory("llama", num_hidden_layers=4)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, four_layers) -> Path:
    """A 4-layer tiny llama with adapters in the last 2 layers: a frozen prefix of 2 layers."""
    return tiny_bundle(tmp_path_factory, four_layers, "llama4-last2", layers=2)


@pytest.fixture(scope="module")
def qlora_bundle(tmp_path_factory, four_layers) -> Path:
    """The same with int4 frozen weights, the prefix's too (--quantize-all-linear)."""
    return tiny_bundle(tmp_path_factory, four_layers, "llama4-last2-int4", layers=2, quantize="int4",
                       quantize_all_linear=True)


def _write_data(path: Path, count: int, offset: int = 0) -> Path:
    """Lines of different lengths (so batches are padded), some repeated (the same row twice)."""
    lines = []
    for i in range(offset, offset + count):
        words = " ".join(_WORDS[(i * k) % len(_WORDS)] for k in range(1, 3 + i % 9))
        lines.append(json.dumps({"prompt": f"Q{i % 5}: {words}?", "completion": f" {_WORDS[i % 10]} {i % 7}."}))
    lines.append(lines[1])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("prefix-data")
    return {"train": _write_data(folder / "train.jsonl", 19), "valid": _write_data(folder / "valid.jsonl", 5, offset=50)}


def _train(bundle: Path, data: dict, out: Path, stop_after: int | None = None, **settings) -> dict:
    config = TrainConfig(bundle=str(bundle), data=str(data["train"]), out=str(out), valid=str(data["valid"]),
                         seq_len=64, batch_size=3, threads=1, lr=5e-3, warmup=2, eval_every=4, save_every=4,
                         epochs=3, **settings)
    if stop_after is not None:
        config.extra["stop_after"] = stop_after
    return train(config, quiet=True)


def _losses(run: Path) -> list[tuple[int, str, float]]:
    return [(record["step"], key, record[key]) for record in read_metrics(run)
            for key in ("loss", "eval_loss") if key in record]


def _assert_same_losses(cached: Path, uncached: Path) -> None:
    expected, got = _losses(uncached), _losses(cached)
    assert [(step, key) for step, key, _ in got] == [(step, key) for step, key, _ in expected]
    for (step, key, value), (_, _, reference) in zip(got, expected):
        assert abs(value - reference) <= RELATIVE * abs(reference), (step, key, value, reference)


SETTINGS = {
    "padded": {},
    "pack": {"pack": True},
    "batch-tokens": {"batch_tokens": 96},
    "grad-accum": {"grad_accum": 2},
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_cached_losses_equal_the_uncached_run_step_for_step(bundle, data, tmp_path, name):
    settings = SETTINGS[name]
    uncached = _train(bundle, data, tmp_path / "uncached", prefix_cache=False, **settings)
    cached = _train(bundle, data, tmp_path / "cached", **settings)
    _assert_same_losses(tmp_path / "cached", tmp_path / "uncached")
    assert uncached["prefix_cache"] is None
    stats = cached["prefix_cache"]
    # Every row's prefix ran once (the repeated line makes one row fewer than examples without packing);
    # epochs 2 and 3 and the evaluations after the first took every row from the cache.
    assert stats["misses"] == stats["rows"] and stats["hits"] > 2 * stats["rows"]
    assert stats["spilled_mb"] == 0.0
    if name == "padded":
        assert stats["rows"] == 19 + 5  # 20 + 6 lines, each file repeating one: distinct rows only


def test_qlora_bundle_caches_its_quantized_prefix(qlora_bundle, data, tmp_path):
    manifest = json.loads((qlora_bundle / "manifest.json").read_text())
    assert manifest["prefix_cache"]["layers"] == 2 and manifest["quantization"]["scheme"] == "int4"
    _train(qlora_bundle, data, tmp_path / "uncached", prefix_cache=False)
    cached = _train(qlora_bundle, data, tmp_path / "cached")
    _assert_same_losses(tmp_path / "cached", tmp_path / "uncached")
    assert cached["prefix_cache"]["hits"] > 0


def test_a_cache_over_its_budget_spills_to_the_run_folder_and_removes_the_file(bundle, data, tmp_path, monkeypatch):
    _train(bundle, data, tmp_path / "uncached", prefix_cache=False)
    spill_files = []
    original = HiddenStateStore.close

    def close_and_note(store):
        spill_files.append(store.spill_path)
        original(store)

    monkeypatch.setattr(HiddenStateStore, "close", close_and_note)
    cached = _train(bundle, data, tmp_path / "cached", prefix_cache_mb=0.002)  # ~2 KB: a row or two in memory
    _assert_same_losses(tmp_path / "cached", tmp_path / "uncached")
    stats = cached["prefix_cache"]
    assert stats["spilled_mb"] > 0 and stats["memory_mb"] <= 0.002
    assert spill_files and spill_files[0].parent == tmp_path / "cached" and spill_files[0].name.startswith(SPILL_PREFIX)
    assert not list((tmp_path / "cached").glob(SPILL_PREFIX + "*"))


def test_resume_rebuilds_the_cache_and_matches_the_uninterrupted_uncached_run(bundle, data, tmp_path):
    _train(bundle, data, tmp_path / "uncached", prefix_cache=False)
    first = _train(bundle, data, tmp_path / "cached", stop_after=9)
    assert not first["finished"]
    resumed = _train(bundle, data, tmp_path / "cached", resume=True)
    assert resumed["finished"]
    _assert_same_losses(tmp_path / "cached", tmp_path / "uncached")
    assert resumed["prefix_cache"]["misses"] == resumed["prefix_cache"]["rows"] > 0


def test_store_keeps_rows_in_memory_then_in_the_spill_file(tmp_path):
    store = HiddenStateStore(hidden_size=3, budget=2 * 3 * 4, folder=tmp_path)
    rows = {bytes([i]): np.arange(3 * (i + 1), dtype=np.float32).reshape(i + 1, 3) * (i + 1) for i in range(4)}
    for key, value in rows.items():
        store.put(key, value)
    # the first row (12 bytes) fits; the second (24) would pass the budget, so it and the rest spill
    assert store.stats.memory_bytes == 12 and store.stats.spilled_bytes == sum(v.nbytes for v in rows.values()) - 12
    for key, value in rows.items():
        np.testing.assert_array_equal(store.get(key), value)
    spill = store.spill_path
    assert spill.is_file() and len(store) == 4
    store.close()
    assert not spill.exists() and len(store) == 0


def test_rows_are_keyed_by_tokens_and_positions_not_padding():
    ids = np.array([[5, 6, 7, 0], [5, 6, 7, 9]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    positions = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    lengths, keys = batch_row_keys({"input_ids": ids, "attention_mask": mask, "position_ids": positions})
    assert lengths.tolist() == [3, 4] and keys[0] != keys[1]
    _, same = batch_row_keys({"input_ids": ids[:1, :3], "attention_mask": mask[:1, :3], "position_ids": positions[:1, :3]})
    assert same[0] == keys[0]
    packed = np.array([[0, 1, 0, 0]])  # the same tokens as two packed examples: another row
    _, other = batch_row_keys({"input_ids": ids[:1], "attention_mask": np.ones((1, 4), int), "position_ids": packed})
    assert other[0] not in keys
    assert batch_row_keys({"input_ids": ids, "attention_mask": np.array([[0, 1, 1, 1]] * 2), "position_ids": positions}) is None


def test_budget_from_the_flag_or_free_memory():
    assert budget_bytes(1.5) == int(1.5 * 1024 * 1024)
    assert budget_bytes(0) == 0
    assert budget_bytes(None) > 0


def test_a_killed_run_s_spill_file_is_removed_by_the_next_store(tmp_path):
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{SPILL_PREFIX}{int(gone.stdout)}-abcd1234.f32"
    stale.write_bytes(b"\0" * 16)
    mine = HiddenStateStore(hidden_size=2, budget=0, folder=tmp_path)
    mine.put(b"k", np.ones((1, 2), np.float32))
    assert not stale.exists() and mine.spill_path.exists()
    HiddenStateStore(hidden_size=2, budget=0, folder=tmp_path)  # a live process's file stays
    assert mine.spill_path.exists()
    mine.close()
