"""genai_config.json: what onnxruntime-genai (Microsoft's on-device LLM runtime) needs to run an ONNX export.

Written for onnxruntime-genai 0.18's keys: the model type, head size and counts, context length,
special token ids, the graph's input/output names, and `past_present_share_buffer: false` because
ortft's graphs grow the KV cache by Concat (genai then passes each step's present tensors back as the
next step's past). An export with adapters as graph inputs (onnx-adapter) needs nothing more here:
genai's Adapters API feeds them from `.onnx_adapter` files. Device side: plain dicts.
"""

from __future__ import annotations

from .bundle import BundleManifest
from .errors import BundleError

GENAI_CONFIG_FILE = "genai_config.json"
# Model types onnxruntime-genai 0.18 runs as a plain decoder (`type` in genai_config.json).
GENAI_MODEL_TYPES = ("llama", "mistral", "qwen2", "phi3", "gemma")
PAST_PREFIX = "past_key_values."


def genai_model_type(manifest: dict, model_config: dict | None) -> str:
    """`LlamaForCausalLM` -> `llama`: genai's own rule (the architecture's name before `For`, lower case)."""
    architectures = (model_config or {}).get("architectures") or [BundleManifest.of(manifest).source.get("architecture") or ""]
    name = str(architectures[0])
    model_type = (name[: name.find("For")] if "For" in name else name).lower()
    if model_type not in GENAI_MODEL_TYPES:
        raise BundleError(f"onnxruntime-genai has no model type for architecture {name or '(unknown)'}",
                          hint=f"genai_config.json is written for: {', '.join(GENAI_MODEL_TYPES)}")
    return model_type


def genai_config(manifest: dict, model_config: dict | None, model_file: str = "model.onnx",
                 session_config: dict[str, str] | None = None) -> dict:
    """genai_config.json for the causal LM of `manifest` (a bundle manifest) exported as `model_file`."""
    manifest = BundleManifest.of(manifest)
    model = manifest.model
    inference = manifest.inference
    config = model_config or {}
    head_size = int(inference.get("head_dim") or config.get("head_dim") or model["head_dim"])
    hidden_size = int(config.get("hidden_size") or model["hidden_size"])
    num_heads = int(config.get("num_attention_heads") or model.get("num_attention_heads") or hidden_size // head_size)
    context_length = int(config.get("max_position_embeddings") or model.get("max_seq_len"))
    eos_ids = [int(i) for i in model.get("eos_token_ids") or []]
    if not eos_ids:
        raise BundleError("the bundle's manifest names no eos token id", hint="prepare the bundle again")
    pad_id = model.get("pad_token_id")
    bos_id = model.get("bos_token_id")
    input_names = {value["name"] for value in inference["inputs"]}
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in input_names:
        inputs["position_ids"] = "position_ids"
    inputs.update(past_key_names=PAST_PREFIX + "%d.key", past_value_names=PAST_PREFIX + "%d.value")
    session_options = {"log_id": "onnxruntime-genai", "provider_options": []}
    session_options.update(session_config or {})
    return {
        "model": {
            "bos_token_id": int(bos_id) if bos_id is not None else eos_ids[0],
            "context_length": context_length,
            "decoder": {
                "session_options": session_options,
                "filename": model_file,
                "head_size": head_size,
                "hidden_size": hidden_size,
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "num_attention_heads": num_heads,
                "num_hidden_layers": int(inference.get("num_layers") or model["num_layers"]),
                "num_key_value_heads": int(inference.get("num_key_value_heads") or model["num_key_value_heads"]),
            },
            "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
            "pad_token_id": int(pad_id) if pad_id is not None else eos_ids[0],
            "type": genai_model_type(manifest, model_config),
            "vocab_size": int(config.get("vocab_size") or model["vocab_size"]),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,  # the graph concatenates past and new keys/values
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }
