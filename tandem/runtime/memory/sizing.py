"""How big each stage's caches are, in one place for the model runner (which allocates them) and the planner
(which predicts them from config.json).

A stage holds two pools, for its own layers only: a paged KV pool of `max_total_tokens` tokens over its
full-attention layers (`StageCacheShape.kv_bytes_per_token` each) and a linear-attention state pool of
`state_slots` slots over its Gated-DeltaNet layers (`state_bytes_per_slot` each). Running requests hold one
state slot each; with the radix cache on, a hybrid model keeps as many slots again for the state snapshots
at cached prefix ends.

Sizing (`size_requests`, then `size_tokens`), per stage, then agreed across stages (the minimum), because
the driver hands out page ids and slot ids once for every stage:
- budget = memory x mem_fraction_static - weights - activation reserve (the reserve is measured by a dry run
  of the largest step in the runner, estimated in the planner);
- max_running_requests: the given value, else at most `DEFAULT_MAX_RUNNING_REQUESTS`, and on a stage with
  linear-attention layers no more than `STATE_MEMORY_SHARE` of the budget holds in state slots;
- max_total_tokens: the given value, else what the budget left after the state pool holds, in whole pages,
  but never more than `request_token_cap`: max_running_requests x context_length (each in whole pages),
  all the running requests can hold at once (a small model's pool would otherwise take most of a CPU
  machine's RAM); a stage without full-attention layers has no token limit (None) and is left out of the
  minimum;
- after agreeing, a derived max_running_requests is also capped by the number of pages (a running request
  holds at least one)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from tandem.config import ModelConfig
from tandem.layers.paged_attention import DEFAULT_WORKSPACE_BYTES, decode_chunk_keys
from tandem.models.common import FULL_ATTENTION, LINEAR_ATTENTION
from tandem.runtime.memory.kv_pool import PagedKVPool, max_total_tokens_from_memory
from tandem.runtime.memory.state_pool import LinearStatePool

DEFAULT_MAX_RUNNING_REQUESTS = 256
STATE_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class StageCacheShape:
    """The cache-relevant shape of one rank's stage: which of its layers need KV and which need state."""

    attn_layers: tuple[int, ...]
    linear_layers: tuple[int, ...]
    kv_heads: int  # per TP rank
    q_heads: int  # per TP rank
    head_dim: int
    conv_channels: int  # per TP rank
    conv_kernel: int
    v_heads: int  # per TP rank
    key_dim: int
    value_dim: int
    dtype: torch.dtype

    @classmethod
    def from_layers(cls, layers: dict[int, nn.Module], config: ModelConfig, dtype: torch.dtype) -> "StageCacheShape":
        """From a stage's own built decoder layers (global index -> `DecoderLayer` of tandem.models)."""
        attn = tuple(i for i, layer in layers.items() if layer.kind == FULL_ATTENTION)
        linear = tuple(i for i, layer in layers.items() if layer.kind == LINEAR_ATTENTION)
        first_attn = layers[attn[0]].self_attn if attn else None
        first_gdn = layers[linear[0]].linear_attn if linear else None
        return cls(attn, linear, first_attn.num_kv_heads if first_attn else 0,
                   first_attn.num_heads if first_attn else 0, config.head_dim,
                   first_gdn.conv_channels if first_gdn else 0, config.linear_conv_kernel_dim,
                   first_gdn.num_v_heads if first_gdn else 0, config.linear_key_head_dim,
                   config.linear_value_head_dim, dtype)

    @property
    def kv_bytes_per_token(self) -> int:
        return PagedKVPool.bytes_per_token(len(self.attn_layers), self.kv_heads, self.head_dim, self.dtype)

    @property
    def decode_chunk_keys(self) -> int:
        """Key slots one decode attention chunk may gather (`PagedAttentionMetadata.build`)."""
        return decode_chunk_keys(DEFAULT_WORKSPACE_BYTES, self.q_heads, self.kv_heads, self.head_dim, self.dtype)

    @property
    def state_bytes_per_slot(self) -> int:
        return LinearStatePool.bytes_per_slot(len(self.linear_layers), self.conv_channels, self.conv_kernel,
                                              self.v_heads, self.key_dim, self.value_dim, self.dtype)

    def allocate(self, max_total_tokens: int, page_size: int, state_slots: int, device,
                 zero_fill: bool = True) -> tuple[PagedKVPool, LinearStatePool]:
        kv = PagedKVPool(list(self.attn_layers), max_total_tokens // page_size, page_size, self.kv_heads,
                         self.head_dim, self.dtype, device, zero_fill=zero_fill)
        state = LinearStatePool(list(self.linear_layers), state_slots, self.conv_channels, self.conv_kernel,
                                self.v_heads, self.key_dim, self.value_dim, self.dtype, device, zero_fill=zero_fill)
        return kv, state


def layer_kv_bytes_per_token(layer: nn.Module, config: ModelConfig, dtype: torch.dtype) -> int:
    """KV bytes per token of one built decoder layer on its TP rank (0 for a linear-attention layer)."""
    if layer.kind != FULL_ATTENTION:
        return 0
    return PagedKVPool.bytes_per_token(1, layer.self_attn.num_kv_heads, config.head_dim, dtype)


def layer_state_bytes_per_slot(layer: nn.Module, config: ModelConfig, dtype: torch.dtype) -> int:
    """State bytes per slot of one built decoder layer on its TP rank (0 for a full-attention layer)."""
    if layer.kind != LINEAR_ATTENTION:
        return 0
    gdn = layer.linear_attn
    return LinearStatePool.bytes_per_slot(1, gdn.conv_channels, config.linear_conv_kernel_dim, gdn.num_v_heads,
                                          config.linear_key_head_dim, config.linear_value_head_dim, dtype)


def is_hybrid(config: ModelConfig) -> bool:
    """Whether the model has linear-attention layers (whose state a prefix-cache hit must restore)."""
    return "linear_attention" in config.layer_types


def state_slots_per_request(config: ModelConfig, radix_cache: bool) -> int:
    """State slots per running request: its own, plus (hybrid with the radix cache) one for snapshots."""
    return 2 if radix_cache and is_hybrid(config) else 1


@dataclass(frozen=True)
class StageMemory:
    """What a stage's memory-derived sizing starts from."""

    memory_bytes: int  # the device's memory (CUDA: total; CPU: available RAM / ranks on the node)
    mem_fraction: float
    weight_bytes: int
    activation_reserve_bytes: int

    @property
    def budget(self) -> int:
        """Bytes left for the caches: memory x mem_fraction_static - weights - activation reserve (may be < 0)."""
        return int(self.memory_bytes * self.mem_fraction) - self.weight_bytes - self.activation_reserve_bytes


def size_requests(max_running_requests: int | None, memory: StageMemory | None, state_bytes_per_slot: int,
                  slots_per_request: int) -> int:
    """One stage's max_running_requests: the given value, or the default, capped for a stage with
    linear-attention layers by the state slots `STATE_MEMORY_SHARE` of the budget holds (memory None: the
    pool size is given, not derived from memory). May be 0: the caller reports that nothing fits."""
    if max_running_requests is not None:
        return max_running_requests
    limit = DEFAULT_MAX_RUNNING_REQUESTS
    if memory is not None and state_bytes_per_slot:
        share = max(0, int(memory.budget * STATE_MEMORY_SHARE))
        limit = min(limit, share // (slots_per_request * state_bytes_per_slot))
    return limit


def request_token_cap(requests: int, context_length: int, page_size: int) -> int:
    """The KV tokens `requests` running requests of at most `context_length` tokens each can hold at once,
    each in whole pages: a pool sized from memory is never larger."""
    return requests * -(-context_length // page_size) * page_size


def size_tokens(max_total_tokens: int | None, memory: StageMemory | None, state_bytes: int,
                kv_bytes_per_token: int, page_size: int, cap: int | None = None) -> int | None:
    """One stage's KV capacity in tokens (whole pages): the given max_total_tokens, or what the budget holds
    after the state pool (`state_bytes`), at most `cap` (`request_token_cap`). None for a stage without
    full-attention layers (no token limit). Raises ValueError naming the numbers when not even one page fits."""
    if max_total_tokens is not None:
        return max_total_tokens // page_size * page_size
    if kv_bytes_per_token == 0:
        return None
    tokens = max_total_tokens_from_memory(memory.memory_bytes, memory.mem_fraction, memory.weight_bytes,
                                          memory.activation_reserve_bytes + state_bytes, kv_bytes_per_token,
                                          page_size)
    return tokens if cap is None else min(tokens, cap)


def agreed_min(values) -> int | None:
    """The minimum over stages of the values that are not None (None if all are)."""
    present = [v for v in values if v is not None]
    return min(present) if present else None


def final_requests(max_running_requests: int | None, agreed_requests: int, agreed_tokens: int,
                   page_size: int) -> int:
    """A derived max_running_requests is also capped by the pages (each running request holds one)."""
    if max_running_requests is not None:
        return agreed_requests
    return max(1, min(agreed_requests, agreed_tokens // page_size))
