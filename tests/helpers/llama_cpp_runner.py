"""Run a GGUF export with llama.cpp (llama-cpp-python, in its own venv: scripts/llama-cpp-venv.sh): the tests' consumer.

Usage: PYTHON_OF_LLAMA_CPP_VENV llama_cpp_runner.py REQUEST.json; prints one JSON object.
  request: {"model": path.gguf, "lora": path.gguf or null, "prompts": [[ids], ...], "texts": ["...", ...],
            "max_new_tokens"}
  answer:  {"generated": [[new ids] per prompt] (greedy from the logits; stops at eos, left out),
            "tokenized": [[ids] per text] (llama.cpp's tokenizer, specials as the GGUF says), "eos": id,
            "bos": id, "chat_template": the GGUF's or null, "llama_cpp": version}
Only llama_cpp, numpy and the standard library are imported: ortft is not installed in that venv.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import numpy as np
    from llama_cpp import Llama, __version__

    with open(sys.argv[1], encoding="utf-8") as handle:
        request = json.load(handle)
    llm = Llama(model_path=request["model"], lora_path=request.get("lora"), n_ctx=256, n_threads=1, n_batch=64,
                logits_all=True, verbose=False, seed=0)
    eos = llm.token_eos()
    generated = []
    for prompt in request.get("prompts") or []:
        llm.reset()
        llm.eval(prompt)
        new = []
        for _ in range(request["max_new_tokens"]):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if token == eos:
                break
            new.append(token)
            llm.eval([token])
        generated.append(new)
    tokenized = [llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) for text in request.get("texts") or []]
    print(json.dumps({"generated": generated, "tokenized": tokenized, "eos": eos, "bos": llm.token_bos(),
                      "chat_template": llm.metadata.get("tokenizer.chat_template"), "llama_cpp": __version__}))


if __name__ == "__main__":
    main()
