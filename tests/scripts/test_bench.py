"""Smoke test of scripts/bench.py: the tiny case runs end to end and writes the JSON it promises.

Timings are never asserted (the machine may be busy); only that the figures exist and are positive.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

KEYS = (
    "case", "ortft_tokens_per_s", "torch_tokens_per_s", "ortft_peak_rss_mb", "torch_peak_rss_mb",
    "matmul_peak_gflops", "ortft_peak_fraction", "speedup", "speedup_ceiling", "rss_ratio", "ortft_first_step_s",
    "torch_first_step_s", "flops_per_token", "ortft_tokens_per_s_spread", "torch_tokens_per_s_spread",
    "settings", "date", "cpu_model", "cores", "versions",
)


def test_bench_tiny_case_writes_json(tmp_path):
    out = tmp_path / "tmp.json"
    markdown = tmp_path / "benchmarks.md"
    markdown.write_text("# Benchmarks\n\n<!-- ortft-bench:begin -->\nNo measurements yet.\n<!-- ortft-bench:end -->\n")
    command = [
        sys.executable, str(ROOT / "scripts" / "bench.py"), "--case", "tiny", "--repeats", "1", "--steps", "3",
        "--warmup-steps", "1", "--json", str(out), "--markdown", str(markdown),
        "--cache-dir", str(tmp_path / "cache"), "--peak-size", "512", "--peak-seconds", "0.2",
    ]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(out.read_text())
    missing = [key for key in KEYS if key not in result]
    assert not missing, missing
    assert result["case"] == "tiny"
    assert result["ortft_tokens_per_s"] > 0 and result["torch_tokens_per_s"] > 0
    assert result["ortft_peak_rss_mb"] > 0 and result["torch_peak_rss_mb"] > 0
    assert result["matmul_peak_gflops"] > 0 and result["flops_per_token"] > 0
    assert not result["ortft_imported_torch"]
    for name in ("ortft", "torch", "onnxruntime", "transformers", "peft", "numpy"):
        assert result["versions"][name]
    table = markdown.read_text()
    assert "| tiny |" in table and "No measurements yet." not in table


def _load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ortft_bench_script", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_cached_bundle_made_by_other_graph_code_is_stale(tmp_path, monkeypatch):
    """The cache check compares settings, ortft's version and a hash of the graph-building code."""
    from ortft import __version__

    bench = _load_bench()
    tree = tmp_path / "tree"
    for relative in ("ortft/graph/a_pass.py", "ortft/prepare/step.py", "ortft/config.py", "ortft/quantize.py",
                     "ortft/manifest.py", "ortft/train.py"):
        (tree / relative).parent.mkdir(parents=True, exist_ok=True)
        (tree / relative).write_text(f"# {relative}\n")
    monkeypatch.setattr(bench, "ROOT", tree)
    bundle = tmp_path / "cache" / "bundle-x"
    bundle.mkdir(parents=True)
    config = bench.bundle_config({"model": "tiny", "layers": None, "source": None, "hf_dir": str(tmp_path / "hf"),
                                  "bundle": str(bundle)})
    settings = {key: value for key, value in json.loads(json.dumps(config.to_dict())).items() if key not in ("force", "verbose")}
    (bundle / "manifest.json").write_text(json.dumps({"prepare": {"config": settings}, "versions": {"ortft": __version__}}))
    assert not bench.bundle_matches(bundle, config)  # no stamp: made before stamps, or by a killed build
    bench.code_stamp(bundle).write_text(bench.bundle_code_hash())
    assert bench.bundle_matches(bundle, config)
    (tree / "ortft/train.py").write_text("# the device loop changed: no rebuild needed\n")
    assert bench.bundle_matches(bundle, config)
    (tree / "ortft/graph/a_pass.py").write_text("# a graph pass changed\n")
    assert not bench.bundle_matches(bundle, config)
    bench.code_stamp(bundle).write_text(bench.bundle_code_hash())
    config.loss_chunk_rows = 7  # other prepare settings
    assert not bench.bundle_matches(bundle, config)


def test_the_ceiling_counts_causal_attention_once_and_every_flop_at_the_peak():
    bench = _load_bench()
    dims = {"hidden": 8, "intermediate": 16, "layers": 2, "heads": 2, "kv_heads": 1, "head_dim": 4, "vocab": 32}
    adapter = {"layers": [0, 1], "rank": 2, "targets": ["q_proj", "v_proj"]}
    flops = bench.count_flops(dims, [(10, 9)], adapter, lm_head_at_labels=True)
    full_attention = 10 * 10 * 4 * 8 * (2 + 2 * 2)
    assert flops["attention"] == full_attention
    assert flops["minimum"] == flops["total"] - full_attention + full_attention * 55 / 100  # 10 * 11 / 2 of 100
    # PyTorch at 1 token/s against a peak that does the minimum in 0.25 s: ortft could be at most 4x faster.
    peak_gflops = flops["minimum"] / 10 / 0.25 / 1e9
    assert abs(bench.ceiling_speedup(flops, 1.0, peak_gflops) - 4.0) < 1e-9


def test_rows_written_before_the_ceiling_column_get_an_empty_cell():
    bench = _load_bench()
    old = "| smollm2-raw | 216 | 221 | 0.98 | 1695 MB | 3958 MB | 0.43 | 61% |"
    row = bench.with_ceiling_cell(old)
    assert row.count("|") == bench.TABLE_HEAD.splitlines()[0].count("|")
    assert row.split("|")[4].strip() == "0.98" and row.split("|")[5].strip() == ""
    assert bench.with_ceiling_cell(row) == row
