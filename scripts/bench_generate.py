"""Greedy generation speed: ortft's merged ONNX export vs transformers `generate` (PyTorch), same machine.

Run: python scripts/bench_generate.py [--bundle artifacts/demo/bundle] [--export DIR] [--new-tokens 64] [--repeats 3]
Each side runs in its own fresh process, alternating; the JSON and the printed line give the median
decode tokens/s (prompt processing excluded) and the ratio. Without --export, the bundle's inference
template (the base model with KV cache: exactly what a merged export costs) is used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def worker_ortft(model_dir: str, new_tokens: int, threads: int) -> dict:
    from ortft.generate import SamplingSettings, open_generator

    generator = open_generator(model_dir, threads=threads)
    messages = [{"role": "user", "content": PROMPT}]
    prompt = generator.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    prompt_ids = generator.tokenizer.encode(prompt, add_special_tokens=False)
    generator.generate_ids(prompt_ids, SamplingSettings(max_new_tokens=4))  # warm-up
    ids = generator.generate_ids(prompt_ids, SamplingSettings(max_new_tokens=new_tokens))
    stats = generator.stats
    return {"new_tokens": len(ids), "decode_s": stats.decode_s, "prefill_s": stats.prefill_s, "ids": ids,
            "tokens_per_s": (len(ids) - 1) / stats.decode_s if stats.decode_s else 0.0}


def worker_torch(source_dir: str, gguf_file: str | None, new_tokens: int, threads: int, eos_ids: list[int]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source_dir, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32, **kwargs).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    input_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    with torch.inference_mode():
        model.generate(input_ids, max_new_tokens=4, do_sample=False, eos_token_id=eos_ids, pad_token_id=pad)
        t0 = time.perf_counter()
        model(input_ids)  # prefill alone, to subtract it from the total
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos_ids, pad_token_id=pad)
        total_s = time.perf_counter() - t0
    ids = out[0, input_ids.shape[1]:].tolist()
    decode_s = max(total_s - prefill_s, 1e-9)
    return {"new_tokens": len(ids), "decode_s": decode_s, "prefill_s": prefill_s, "ids": ids,
            "tokens_per_s": (len(ids) - 1) / decode_s}


def run_worker(args: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"worker failed: {' '.join(args)}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="artifacts/demo/bundle", help="a causal-lm bundle (its manifest names the source model)")
    parser.add_argument("--export", default=None, help="a merged-onnx export to time instead of the bundle's template")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="threads for both sides (default: physical cores)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--worker", choices=["ortft", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    from ortft.manifest import read_manifest
    from ortft.threads import default_threads

    threads = args.threads or default_threads()
    manifest = read_manifest(args.bundle)
    if args.worker == "ortft":
        print(json.dumps(worker_ortft(args.export or args.bundle, args.new_tokens, threads)))
        return
    if args.worker == "torch":
        source = manifest["source"]
        print(json.dumps(worker_torch(source["path"], source.get("gguf_file"), args.new_tokens, threads, manifest["model"]["eos_token_ids"])))
        return

    common = ["--bundle", args.bundle, "--new-tokens", str(args.new_tokens), "--threads", str(threads)]
    if args.export:
        common += ["--export", args.export]
    runs = {"ortft": [], "torch": []}
    for _ in range(args.repeats):
        for side in ("ortft", "torch"):
            runs[side].append(run_worker(["--worker", side, *common]))
    ortft_tps = statistics.median(r["tokens_per_s"] for r in runs["ortft"])
    torch_tps = statistics.median(r["tokens_per_s"] for r in runs["torch"])
    same_tokens = runs["ortft"][0]["ids"] == runs["torch"][0]["ids"]
    report = {
        "case": "generate-greedy",
        "model": manifest["source"]["architecture"],
        "new_tokens": runs["ortft"][0]["new_tokens"],
        "threads": threads,
        "ortft_tokens_per_s": ortft_tps,
        "torch_tokens_per_s": torch_tps,
        "speedup": ortft_tps / torch_tps if torch_tps else None,
        "ortft_spread": [min(r["tokens_per_s"] for r in runs["ortft"]), max(r["tokens_per_s"] for r in runs["ortft"])],
        "torch_spread": [min(r["tokens_per_s"] for r in runs["torch"]), max(r["tokens_per_s"] for r in runs["torch"])],
        "same_tokens": same_tokens,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"greedy decode, {report['new_tokens']} new tokens, {threads} threads: ortft {ortft_tps:.1f} tok/s, "
          f"transformers {torch_tps:.1f} tok/s, speedup {report['speedup']:.2f}x, identical tokens: {same_tokens}")
    if args.json:
        from ortft.fsutil import write_json_atomic

        write_json_atomic(args.json, report)


if __name__ == "__main__":
    main()
