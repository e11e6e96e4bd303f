"""Which of a stage's modules hold block-wise FP8 weights, decided from checkpoint names alone, and their
conversion to FP8 storage as each decoder layer is built (before any tensor is read; the embedding, LM head
and norms are not linear layers and stay in the engine's dtype).

A linear layer or expert stack is FP8 when every checkpoint tensor that feeds it (q, k and v of a fused QKV;
each expert's gate / up) is, by `Fp8Config.quantized_module`; mixed pieces are refused. Embeddings, the LM
head and norms are never linear layers here, so they stay in the engine's dtype."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from tandem.config import ModelConfig
from tandem.errors import ConfigError
from tandem.layers.fp8_layout import LINEAR_TYPES, quantize_module
from tandem.layers.moe import StackedExperts
from tandem.models.checkpoint_names import checkpoint_name
from tandem.quantization import Fp8Config


def quantize_layer(layer: nn.Module, config: ModelConfig, index: int) -> nn.Module:
    """Decoder layer `index` with its quantized modules in FP8 storage (a no-op without quantization_config).
    Called as each layer is built, so a stage never holds more than one layer's high-precision parameters."""
    if config.quantization is not None:
        convert_to_fp8(layer, config.quantization,
                       lambda name, shard: checkpoint_name(config, f"model.layers.{index}.{name}", shard))
    return layer


def convert_to_fp8(root: nn.Module, quant: Fp8Config, checkpoint_name_of: Callable[[str, object], str]) -> None:
    """Turn the quantized modules under `root` into FP8 storage, in place. checkpoint_name_of(parameter name under root, shard id) -> checkpoint tensor name."""
    for module_name, module in list(root.named_modules()):
        if isinstance(module, StackedExperts):
            params = [f"{module_name}.gate_up_proj", f"{module_name}.down_proj"]
        elif isinstance(module, LINEAR_TYPES):
            params = [f"{module_name}.weight"]
        else:
            continue
        shards = [(name, shard) for name in params for shard in getattr(module, name.rsplit(".", 1)[1]).shard_ids]
        sources = {checkpoint_name_of(name, shard) for name, shard in shards}
        quantized = {source: quant.quantized_module(source.removesuffix(".weight")) for source in sources}
        if not any(quantized.values()):
            continue
        if not all(quantized.values()):
            kept = sorted(source for source, q in quantized.items() if not q)
            fp8 = sorted(source for source, q in quantized.items() if q)
            raise ConfigError(f"{', '.join(fp8[:3])}{' ...' if len(fp8) > 3 else ''} (FP8) and {', '.join(kept[:3])}"
                              f"{' ...' if len(kept) > 3 else ''} (modules_to_not_convert) fill one fused parameter "
                              f"({module_name}); list all of them in modules_to_not_convert or none")
        fused = len(sources) == 1 and len(shards) > 1  # one checkpoint tensor holds every part
        quantize_module(module, quant.weight_block_size, fused)
