"""`CacheGeometry`: how much cache each stage holds, in one place for the model runner (which allocates it)
and the planner (which predicts it from config.json). Capacity is `num_slots` requests of `max_len` tokens;
per layer, a full-attention layer holds keys and values of its KV heads and a Gated-DeltaNet layer holds a
conv state and a float32 recurrent state per slot."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from tandem.config import EngineArgs, ModelConfig
from tandem.runtime.cache import GDNStatePool, KVCachePool

DEFAULT_MAX_LEN_CAP = 4096


@dataclass(frozen=True)
class CacheGeometry:
    num_slots: int
    max_len: int
    dtype: torch.dtype

    @classmethod
    def from_args(cls, model_config: ModelConfig, args: EngineArgs) -> "CacheGeometry":
        max_len = args.context_length or min(model_config.max_position_embeddings, DEFAULT_MAX_LEN_CAP)
        return cls(args.max_running_requests, max_len, args.resolve_dtype(model_config))

    def layer_bytes(self, layer: nn.Module, config: ModelConfig) -> int:
        """Cache bytes of one built decoder layer (a `DecoderLayer` of tandem.models) on its TP rank."""
        if hasattr(layer, "linear_attn"):
            gdn = layer.linear_attn
            return GDNStatePool.layer_bytes(self.num_slots, gdn.conv_channels, config.linear_conv_kernel_dim,
                                            gdn.num_v_heads, config.linear_key_head_dim,
                                            config.linear_value_head_dim, self.dtype)
        return KVCachePool.layer_bytes(self.num_slots, self.max_len, layer.self_attn.num_kv_heads, config.head_dim,
                                       self.dtype)

    def allocate(self, layers: dict[int, nn.Module], config: ModelConfig, device) -> tuple[KVCachePool, GDNStatePool]:
        """The caches of a stage whose own decoder layers are `layers` (global index -> layer)."""
        attn = [i for i, layer in layers.items() if hasattr(layer, "self_attn")]
        gdn = [i for i, layer in layers.items() if hasattr(layer, "linear_attn")]
        kv_heads = layers[attn[0]].self_attn.num_kv_heads if attn else 0
        first = layers[gdn[0]].linear_attn if gdn else None
        kv = KVCachePool(attn, self.num_slots, self.max_len, kv_heads, config.head_dim, self.dtype, device)
        state = GDNStatePool(gdn, self.num_slots, first.conv_channels if first else 0, config.linear_conv_kernel_dim,
                             first.num_v_heads if first else 0, config.linear_key_head_dim,
                             config.linear_value_head_dim, self.dtype, device)
        return kv, state
