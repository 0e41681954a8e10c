"""Run an ortft export with onnxruntime-genai, in genai's own venv (scripts/genai-venv.sh): the tests' consumer.

Usage: PYTHON_OF_GENAI_VENV genai_runner.py REQUEST.json; prints one JSON object.
  request: {"folder", "prompts": [[ids], ...], "texts": ["...", ...], "messages": [{"role", "content"}, ...] (optional),
            "max_new_tokens", "adapters": {name: path} (optional), "runs": [adapter name or null, ...] (default [null])}
  answer:  {"generated": {str(run): [[new ids] per prompt, then per text]} (greedy; stops at an eos, which is left
            out), "encoded": [[ids] per text], "decoded": {str(run): [text, ...]}, "chat": rendered messages or null,
            "eos_token_ids": [...], "onnxruntime_genai": version}
Only onnxruntime_genai and the standard library are imported: ortft is not installed in that venv.
"""

from __future__ import annotations

import json
import sys


def generate(model, og, prompt: list[int], max_new_tokens: int, eos_ids: set[int], adapters=None, adapter=None) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    new = [int(token) for token in generator.get_sequence(0)[len(prompt):]]
    if new and new[-1] in eos_ids:
        new = new[:-1]
    return new


def main() -> None:
    import onnxruntime_genai as og

    with open(sys.argv[1], encoding="utf-8") as handle:
        request = json.load(handle)
    model = og.Model(request["folder"])
    tokenizer = og.Tokenizer(model)
    eos_ids = {int(token) for token in tokenizer.eos_token_ids}
    adapters = None
    if request.get("adapters"):
        adapters = og.Adapters(model)
        for name, path in request["adapters"].items():
            adapters.load(path, name)
    encoded = [[int(token) for token in tokenizer.encode(text)] for text in request.get("texts") or []]
    prompts = [list(ids) for ids in request.get("prompts") or []] + encoded
    runs = request.get("runs") or [None]
    generated = {str(name): [generate(model, og, prompt, request["max_new_tokens"], eos_ids, adapters, name) for prompt in prompts]
                 for name in runs}
    decoded = {name: [tokenizer.decode(ids) for ids in outputs] for name, outputs in generated.items()}
    chat = tokenizer.apply_chat_template(json.dumps(request["messages"]), add_generation_prompt=True) if request.get("messages") else None
    print(json.dumps({"generated": generated, "encoded": encoded, "decoded": decoded, "chat": chat,
                      "eos_token_ids": sorted(eos_ids), "onnxruntime_genai": og.__version__}))


if __name__ == "__main__":
    main()
