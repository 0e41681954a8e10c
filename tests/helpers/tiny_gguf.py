"""Test helper: a tiny llama-architecture GGUF file with a GPT-2 style (byte-level BPE) tokenizer.

Written with the `gguf` package from the tiny random model of `ortft.prepare.tiny` (weights and the
in-memory BPE tokenizer), the way llama.cpp's converter lays out SmolLM2: `tokenizer.ggml.model = gpt2`,
its own bos/eos/padding ids and add_bos flag, and a ChatML chat template. Loadable by transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The tiny tokenizer's first tokens: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2 (all CONTROL).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (transformers undoes it when it loads a llama GGUF)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_tiny_gguf(path: Path, model_dir: Path, *, bos_token_id: int = 1, eos_token_id: int = 2,
                    pad_token_id: int | None = 2, add_bos_token: bool | None = False, add_eos_token: bool | None = None,
                    pre: str = "smollm", chat_template: str | None = CHATML_TEMPLATE) -> Path:
    """Write MODEL_DIR (a tiny llama saved by `save_tiny_model`) as a float32 GGUF at PATH.

    None for a flag or id leaves that field out of the file (as some converters do).
    """
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    state = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(file)))
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tokenizer["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in tokenizer["model"]["merges"]]
    token_types = [int(gguf.TokenType.CONTROL) if token in SPECIAL_TOKENS else int(gguf.TokenType.NORMAL) for token in tokens]
    for index in range(len(tokens), config["vocab_size"]):  # the embedding has more rows than the trained vocabulary
        tokens.append(f"[PAD{index}]")  # as llama.cpp's converter pads a vocabulary
        token_types.append(int(gguf.TokenType.UNUSED))

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    hidden = config["hidden_size"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(bos_token_id)
    writer.add_eos_token_id(eos_token_id)
    writer.add_unk_token_id(0)
    if pad_token_id is not None:
        writer.add_pad_token_id(pad_token_id)
    if add_bos_token is not None:
        writer.add_add_bos_token(add_bos_token)
    if add_eos_token is not None:
        writer.add_add_eos_token(add_eos_token)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, value in state.items():
        value = np.ascontiguousarray(value, dtype=np.float32)
        if name in names:
            writer.add_tensor(names[name], value)
            continue
        _, _, layer, rest = name.split(".", 3)  # model.layers.N.<module>.weight
        module = rest.removesuffix(".weight")
        if module == "self_attn.q_proj":
            value = _permute(value, heads)
        elif module == "self_attn.k_proj":
            value = _permute(value, kv_heads)
        writer.add_tensor(f"blk.{layer}.{per_layer[module]}.weight", np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_spm_gguf(path: Path, *, add_bos_token: bool | None = None) -> Path:
    """A tokenizer-only llama GGUF with a SentencePiece (`tokenizer.ggml.model = llama`) vocabulary:
    <unk> <s> </s>, the 256 byte-fallback tokens, then a few scored pieces; no tensors (enough for tokenizers)."""
    import gguf

    pieces = ["▁", "▁h", "▁w", "e", "l", "o", "r", "d", "h", "w", "ll", "llo", "ello", "▁hello", "or", "orld",
              "▁world", "c", "a", "f", "é", "▁c", "▁ca", "▁caf", "▁café", "1", "2", "3"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256)), *pieces]
    types = [int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL), int(gguf.TokenType.CONTROL),
             *[int(gguf.TokenType.BYTE)] * 256, *[int(gguf.TokenType.NORMAL)] * len(pieces)]
    scores = [0.0] * (3 + 256) + [-float(rank) for rank in range(len(pieces))]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(16)
    writer.add_block_count(1)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_space_prefix(True)
    if add_bos_token is not None:
        writer.add_add_bos_token(add_bos_token)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
