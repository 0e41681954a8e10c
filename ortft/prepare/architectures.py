"""The model families `prepare` supports, and what each calls its adapted linear layers.

Families are keyed by the `model_type` in a model's config.json.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError


@dataclass(frozen=True)
class Architecture:
    model_type: str
    tasks: tuple[str, ...]
    attention_modules: tuple[str, ...]
    mlp_modules: tuple[str, ...]
    classifier_modules: tuple[str, ...] = ()

    @property
    def linear_modules(self) -> tuple[str, ...]:
        return self.attention_modules + self.mlp_modules


_LLAMA_LIKE = dict(
    tasks=("causal-lm", "seq-cls", "token-cls"),
    attention_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
    mlp_modules=("gate_proj", "up_proj", "down_proj"),
    classifier_modules=("score",),
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", **_LLAMA_LIKE),
    "mistral": Architecture("mistral", **_LLAMA_LIKE),
    "qwen2": Architecture("qwen2", **_LLAMA_LIKE),
    "gemma": Architecture("gemma", **_LLAMA_LIKE),
    "phi3": Architecture(
        "phi3",
        tasks=("causal-lm", "seq-cls", "token-cls"),
        attention_modules=("qkv_proj", "o_proj"),
        mlp_modules=("gate_up_proj", "down_proj"),
        classifier_modules=("score",),
    ),
    "bert": Architecture(
        "bert",
        tasks=("seq-cls", "token-cls"),
        attention_modules=("query", "key", "value", "attention.output.dense"),
        mlp_modules=("intermediate.dense", "output.dense"),
        classifier_modules=("classifier",),
    ),
}


def supported_list() -> str:
    return ", ".join(f"{name} ({'/'.join(arch.tasks)})" for name, arch in sorted(ARCHITECTURES.items()))


def architecture_for(model_type: str, task: str, where: str) -> Architecture:
    """The Architecture of `model_type`, or a user error listing the supported ones."""
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise ModelError(
            f"{where}: model_type '{model_type}' is not supported",
            hint=f"supported architectures: {supported_list()}",
        )
    if task not in arch.tasks:
        raise ModelError(
            f"{where}: task '{task}' is not supported for model_type '{model_type}'",
            hint=f"'{model_type}' supports: {', '.join(arch.tasks)}",
        )
    return arch
