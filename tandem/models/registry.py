"""Architecture name (config.json `architectures[0]`) -> model class, imported lazily; `load_model_config`,
which reads a checkpoint's config only for an architecture Tandem supports; and `build_model`, the one way a
rank's model is constructed (a rank's runner on its device, the planner and the latency probe on `meta` or
with random weights), inside `building_on` (the default dtype and device of new parameters).

Adding a family is one model file (a `CausalLM` subclass declaring its `BlockSpec`) plus one line here."""

from __future__ import annotations

import contextlib
import importlib
import os

import torch

from tandem.config import ModelConfig
from tandem.errors import UnsupportedArchitectureError
from tandem.parallel.layout import ParallelLayout

_MODELS = {
    "LlamaForCausalLM": ("tandem.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("tandem.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("tandem.models.qwen3", "Qwen3ForCausalLM"),
    "Qwen2MoeForCausalLM": ("tandem.models.qwen2_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("tandem.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "Qwen3_5ForCausalLM": ("tandem.models.qwen3_5", "Qwen3_5ForCausalLM"),
    "Qwen3_5MoeForCausalLM": ("tandem.models.qwen3_5", "Qwen3_5MoeForCausalLM"),
    # multimodal checkpoints: we serve their text model
    "Qwen3_5ForConditionalGeneration": ("tandem.models.qwen3_5", "Qwen3_5ForCausalLM"),
    "Qwen3_5MoeForConditionalGeneration": ("tandem.models.qwen3_5", "Qwen3_5MoeForCausalLM"),
}


def register(architecture: str, module: str, class_name: str) -> None:
    """Serve `architecture` with `class_name` from the importable module `module` (a full dotted path)."""
    _MODELS[architecture] = (module, class_name)


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
    return getattr(importlib.import_module(module), name)


def load_model_config(model_path: str | os.PathLike) -> ModelConfig:
    """`ModelConfig.from_hf` for a supported architecture; otherwise an `UnsupportedArchitectureError`
    naming it and listing what is supported (checked before transformers parses the config)."""
    check_supported(ModelConfig.architecture_of(model_path))
    return ModelConfig.from_hf(model_path)


@contextlib.contextmanager
def building_on(dtype: torch.dtype, device):
    """Modules constructed inside get their parameters (uninitialised) in `dtype` on `device`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def has_mtp_head(model_config: ModelConfig) -> bool:
    """Whether the family reads an MTP head (`WithMTP`) and the checkpoint's config declares one."""
    from tandem.models.mtp import WithMTP

    return issubclass(get_model_class(model_config.architecture), WithMTP) and model_config.mtp_num_hidden_layers > 0


def build_model(model_config: ModelConfig, layout: ParallelLayout, dtype: torch.dtype, device, mtp: bool = False):
    """The model of one rank of `layout`, with parameters allocated (uninitialised) on `device`; with `mtp`
    (speculative decoding with NEXTN) the last stage also builds the checkpoint's MTP head."""
    cls = get_model_class(model_config.architecture)
    with building_on(dtype, device):
        return cls(model_config, layout, mtp=True) if mtp else cls(model_config, layout)
