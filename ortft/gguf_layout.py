"""llama.cpp's GGUF layout for the model families ortft exports: architecture, tensor names, row order, hyperparameters.

Mirrors llama.cpp's convert_hf_to_gguf.py for these families:
- llama and mistral (GGUF architecture `llama`): llama.cpp rotates pairs of adjacent elements (GPT-J style
  rope), Hugging Face rotates the two halves of each head; q_proj and k_proj rows are permuted per head
  (`permute_rows`), and so are the rows of their LoRA B matrices;
- qwen2 (`qwen2`): no permutation (NeoX-style rope in both); q/k/v biases;
- phi3 (`phi3`): fused qkv_proj (`attn_qkv`) and gate_up_proj (`ffn_up`, gate rows first), no permutation.
A tied LM head is left out (llama.cpp then reads `token_embd`). Device side: numpy and the `gguf` package.
"""

from __future__ import annotations

import numpy as np

from .errors import BundleError

# model_type -> GGUF architecture name (gguf.MODEL_ARCH_NAMES); llama.cpp converts Mistral checkpoints as llama
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "phi3": "phi3"}
PERMUTED_ROWS = {"llama": ("self_attn.q_proj", "self_attn.k_proj")}


def gguf_module():
    """The `gguf` package (llama.cpp's Python writer and reader), or a user error saying how to get it."""
    try:
        import gguf
    except ImportError as exc:
        raise BundleError("GGUF export needs the `gguf` package (llama.cpp's writer)",
                          hint="pip install 'ortft[gguf]'  (or: pip install gguf)") from exc
    return gguf


def gguf_architecture(model_type: str) -> str:
    arch = GGUF_ARCHITECTURES.get(model_type)
    if arch is None:
        raise BundleError(f"GGUF export does not support model type {model_type!r}",
                          hint=f"GGUF export supports: {', '.join(sorted(GGUF_ARCHITECTURES))}; use --format merged-onnx or peft")
    return arch


class TensorNames:
    """Hugging Face parameter name -> GGUF tensor name for one architecture and layer count."""

    def __init__(self, arch: str, num_layers: int):
        gguf = gguf_module()
        self.arch = arch
        arch_enum = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
        self.mapping = gguf.get_tensor_name_map(arch_enum, num_layers)

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name, or None for a parameter llama.cpp has no tensor for."""
        return self.mapping.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def permute_rows(values: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's row order for a Llama q/k projection with `num_heads` heads (its `LlamaModel.permute`):
    within each head, the first and second halves of the rows are interleaved."""
    rows = values.shape[0]
    return np.ascontiguousarray(values.reshape(num_heads, 2, rows // num_heads // 2, *values.shape[1:]).swapaxes(1, 2).reshape(values.shape))


def gguf_rows(hf_name: str, values: np.ndarray, model_type: str, config: dict) -> np.ndarray:
    """`values` ([out, ...] in Hugging Face's row order: a weight, a bias or a LoRA B) in llama.cpp's row order."""
    for module in permuted_modules(model_type):
        if f".{module}." in hf_name:
            heads = int(config["num_attention_heads"])
            if module.endswith("k_proj"):
                heads = int(config.get("num_key_value_heads") or heads)
            return permute_rows(values, heads)
    return values


def permuted_modules(model_type: str) -> tuple[str, ...]:
    """The modules whose rows llama.cpp stores permuted (q and k of GGUF-architecture-llama models)."""
    return PERMUTED_ROWS.get(GGUF_ARCHITECTURES.get(model_type, ""), ())


def write_hyperparameters(writer, arch: str, config: dict, context_length: int) -> None:
    """The `ARCH.*` keys llama.cpp reads for this architecture, from the source model's config.json."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    if config.get("rope_scaling"):
        raise BundleError(f"GGUF export does not write rope scaling ({config['rope_scaling']})",
                          hint="use --format merged-onnx or peft for this model")
    writer.add_context_length(int(context_length))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_vocab_size(int(config["vocab_size"]))
    rotary_dims = int(head_dim * float(config.get("partial_rotary_factor", 1.0)))
    writer.add_rope_dimension_count(rotary_dims)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "phi3":
        writer.add_rope_scaling_orig_ctx_len(int(config.get("original_max_position_embeddings") or context_length))
        if config.get("sliding_window"):
            writer.add_sliding_window(int(config["sliding_window"]))
