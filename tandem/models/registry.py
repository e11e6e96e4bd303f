"""Architecture name (config.json `architectures[0]`) -> model class, imported lazily."""

from __future__ import annotations

import importlib

from tandem.errors import UnsupportedArchitectureError

_MODELS = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "Qwen3_5ForCausalLM": ("qwen3_5", "Qwen3_5ForCausalLM"),
    "Qwen3_5MoeForCausalLM": ("qwen3_5", "Qwen3_5MoeForCausalLM"),
    # multimodal checkpoints: we serve their text model
    "Qwen3_5ForConditionalGeneration": ("qwen3_5", "Qwen3_5ForCausalLM"),
    "Qwen3_5MoeForConditionalGeneration": ("qwen3_5", "Qwen3_5MoeForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def check_supported(architecture: str) -> str:
    if architecture not in _MODELS:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {architecture!r}; Tandem supports: {', '.join(supported_architectures())}"
        )
    return architecture


def get_model_class(architecture: str):
    module, name = _MODELS[check_supported(architecture)]
    return getattr(importlib.import_module(f"tandem.models.{module}"), name)
