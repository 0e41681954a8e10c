"""Smoke test of scripts/bench.py: the tiny case runs end to end and writes the JSON it promises.

Timings are never asserted (the machine may be busy); only that the figures exist and are positive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
        "--cache-dir", str(tmp_path / "cache"), "--peak-size", "512", "--peak-seconds", "0.2", "--provider", "cpu",
    ]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(out.read_text())
    missing = [key for key in KEYS if key not in result]
    assert not missing, missing
    assert result["case"] == "tiny"
    assert result["ortft_provider"] == "cpu" and result["settings"]["provider"] == "cpu"
    assert result["ortft_nodes_per_provider"] is None  # profiled only with an accelerator, as ortft train does
    assert result["ortft_onnxruntime"]["distribution"] == "onnxruntime"
    assert not result["settings"]["ortft_onnxruntime_differs"]
    assert "== tiny ==\n  ortft on cpu;" in completed.stdout
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


def test_provider_options_parse_and_bad_ones_are_refused(capsys):
    bench = _load_bench()
    args = bench.parse_args(["--provider", "cpu"])
    assert args.provider.name == "cpu" and dict(args.provider.options) == {}
    assert args.ortft_python == os.path.abspath(sys.executable) and args.attention_chunk_rows is None
    args = bench.parse_args(["--provider", "openvino:device_type=CPU,precision=FP32", "--attention-chunk-rows", "0"])
    assert args.provider.name == "openvino"
    assert dict(args.provider.options) == {"device_type": "CPU", "precision": "FP32"}
    assert str(args.provider) == "openvino:device_type=CPU,precision=FP32" and args.attention_chunk_rows == 0
    for argv, words in ((["--provider", "openvino:device_type"], "not key=value"),
                        (["--provider", ":x=1"], "empty provider name"),
                        (["--ortft-python", "/no/such/python"], "not an executable file"),
                        (["--attention-chunk-rows", "-1"], "at least 0")):
        with pytest.raises(SystemExit) as stopped:
            bench.parse_args(argv)
        assert stopped.value.code == 2, argv
        assert words in capsys.readouterr().err, argv


def test_a_provider_this_onnxruntime_lacks_stops_before_any_build(tmp_path):
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--case", "tiny", "--provider", "no-such-provider",
               "--cache-dir", str(tmp_path / "cache")]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "unknown execution provider 'no-such-provider'" in completed.stderr
    assert not (tmp_path / "cache").exists()


def test_bundles_for_unchunked_attention_are_cached_apart(tmp_path):
    from ortft.config import ATTENTION_CHUNK_ROWS

    bench = _load_bench()
    default = bench.artifact_paths(tmp_path, "tiny", None)
    unchunked = bench.artifact_paths(tmp_path, "tiny", None, 0)
    assert unchunked["bundle"].name == default["bundle"].name + "-ac0"
    assert unchunked["init"] != default["init"] and unchunked["hf_dir"] == default["hf_dir"]
    spec = {"model": "tiny", "layers": None, "source": None, "hf_dir": str(tmp_path / "hf")}
    assert bench.bundle_config(dict(spec, bundle=str(default["bundle"]))).attention_chunk_rows == ATTENTION_CHUNK_ROWS
    assert bench.bundle_config(dict(spec, bundle=str(unchunked["bundle"]), attention_chunk_rows=0)).attention_chunk_rows == 0


def _result(case: str, tokens_per_s: float, **settings) -> dict:
    """A case result with what the table needs; settings as run_case records them for a provider."""
    return {"case": case, "ortft_tokens_per_s": tokens_per_s, "ortft_tokens_per_s_spread": [tokens_per_s] * 2,
            "torch_tokens_per_s": 100.0, "torch_tokens_per_s_spread": [100.0] * 2, "speedup": tokens_per_s / 100.0,
            "ortft_peak_rss_mb": 300.0, "ortft_peak_rss_mb_spread": [300.0] * 2, "torch_peak_rss_mb": 500.0,
            "torch_peak_rss_mb_spread": [500.0] * 2, "rss_ratio": 0.6, "ortft_peak_fraction": 0.5,
            "ortft_onnxruntime": {"distribution": "onnxruntime-openvino", "version": "1.24.1"},
            "settings": {"provider": "cpu", **settings}}


def test_the_table_names_the_provider_and_keeps_other_providers_rows():
    bench = _load_bench()
    meta = {"date": "2026-12-06T08:00:00+00:00", "cpu_model": "Test CPU", "physical_cores": 2, "logical_cores": 2,
            "threads": 2, "versions": {name: "1" for name in ("ortft", "onnxruntime", "torch", "transformers", "peft",
                                                              "numpy", "python")},
            "matmul_peak_gflops": 100.0, "peak": {"numpy_gflops": 90.0, "ort_gflops": 100.0, "n": 512},
            "repeats": 1, "steps": 2, "warmup_steps": 1}
    on_openvino = {"provider": "openvino:device_type=CPU", "ortft_onnxruntime_differs": True,
                   "attention_chunk_rows_set": True, "attention_chunk_rows": 0}
    cpu = _result("tiny", 200.0)
    openvino = _result("tiny", 300.0, **on_openvino)
    assert bench.case_label(cpu) == "tiny"
    assert bench.case_label(openvino) == ("tiny (ortft on openvino:device_type=CPU; onnxruntime-openvino 1.24.1; "
                                          "attention-chunk-rows 0)")
    assert bench.case_label(_result("smollm2-sft", 1.0, pack_ortft=True, **on_openvino)).startswith(
        "smollm2-sft (ortft --pack; ortft on openvino:device_type=CPU;")
    first = bench.markdown_section(meta, [cpu], None)
    assert "| tiny | 200 | 100 | 2.00 |" in first
    second = bench.markdown_section(meta, [openvino], first)  # the CPU row of the same case stays beside it
    assert "| tiny | 200 |" in second and "| tiny (ortft on openvino:device_type=CPU; onnxruntime-openvino 1.24.1; " \
        "attention-chunk-rows 0) | 300 |" in second
    assert second.index("| tiny | 200 |") < second.index("| tiny (ortft on openvino")
    third = bench.markdown_section(meta, [_result("tiny", 400.0, **on_openvino)], second)  # a re-run replaces its row
    assert "| 300 |" not in third and "| tiny (ortft on openvino:device_type=CPU;" in third and "| tiny | 200 |" in third
    packed = bench.markdown_section(meta, [_result("smollm2-sft", 150.0, pack_ortft=True)],
                                    bench.markdown_section(meta, [_result("smollm2-sft", 120.0)], None))
    assert "| smollm2-sft (ortft --pack) | 150 |" in packed and "| 120 |" not in packed  # other batching: replaced


def openvino_python() -> Path:
    """The interpreter of the OpenVINO venv; scripts/ep-check.sh builds the venv when it is missing."""
    python = ROOT / ".venv-ep-openvino" / "bin" / "python"
    if not python.exists():
        completed = subprocess.run([str(ROOT / "scripts" / "ep-check.sh"), "openvino"], cwd=ROOT, capture_output=True,
                                   text=True, timeout=1800, check=False)
        assert completed.returncode == 0, (completed.stdout + completed.stderr)[-4000:]
    return python


@pytest.mark.slow
def test_bench_tiny_case_on_openvino_in_its_own_venv(tmp_path):
    out = tmp_path / "ov.json"
    markdown = tmp_path / "benchmarks.md"
    command = [
        sys.executable, str(ROOT / "scripts" / "bench.py"), "--case", "tiny", "--provider", "openvino",
        "--ortft-python", str(openvino_python()), "--steps", "2", "--repeats", "1", "--warmup-steps", "1",
        "--json", str(out), "--markdown", str(markdown), "--cache-dir", str(tmp_path / "cache"),
        "--peak-size", "256", "--peak-seconds", "0.1",
    ]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ortft_provider"] == "openvino (+ cpu)" and result["settings"]["provider"] == "openvino"
    assert result["ortft_nodes_per_provider"]["OpenVINOExecutionProvider"] > 0
    assert result["ortft_onnxruntime"]["distribution"] == "onnxruntime-openvino"
    assert result["settings"]["attention_chunk_rows"] == 0 and result["settings"]["bundle"].endswith("-ac0")
    assert result["ortft_tokens_per_s"] > 0 and not result["ortft_imported_torch"]
    assert "ortft on openvino (+ cpu); training graph nodes: OpenVINOExecutionProvider" in completed.stdout
    assert "| tiny (ortft on openvino; onnxruntime-openvino " in markdown.read_text()
