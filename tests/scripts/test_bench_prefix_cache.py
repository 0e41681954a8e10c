"""scripts/bench_prefix_cache.py's FLOP bound: what caching the frozen prefix can give at most."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from helpers.bundles import tiny_bundle

ROOT = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("ortft_bench_prefix_cache", ROOT / "scripts" / "bench_prefix_cache.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _chat_data(path: Path, count: int) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"question {i} about rivers and mountains"},
                          {"role": "assistant", "content": f"answer {i}: seven"}]} for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_the_bound_grows_with_the_frozen_prefix(tmp_path_factory, tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama", num_hidden_layers=4)
    data = _chat_data(tmp_path / "chat.jsonl", 6)
    script = _load_script()
    bounds = {}
    for adapted in (3, 1):  # 1 and 3 frozen layers of 4
        bundle = tiny_bundle(tmp_path_factory, model, f"llama4-last{adapted}", layers=adapted)
        result = script.flop_bound(bundle, data)
        assert result["rows"] == 6 and result["frozen_layers"] == 4 - adapted
        assert 0 < result["prefix_gflop"] < result["step_gflop"]
        assert result["bound"] == result["step_gflop"] / (result["step_gflop"] - result["prefix_gflop"])
        bounds[adapted] = result["bound"]
    assert 1.0 < bounds[3] < bounds[1]
