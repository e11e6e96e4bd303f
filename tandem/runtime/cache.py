"""Per-stage caches, allocated only for the stage's own layers.

`KVCachePool`: keys/values of the stage's full-attention layers, one slot of `max_len` tokens per request.
`GDNStatePool`: conv and recurrent states of the stage's Gated-DeltaNet layers, one slot per request.
A stage without layers of a kind allocates nothing for it."""

from __future__ import annotations

import torch


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class KVCachePool:
    @staticmethod
    def layer_bytes(num_slots: int, max_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one full-attention layer's keys and values take."""
        return 2 * num_slots * max_len * num_kv_heads * head_dim * _element_size(dtype)

    def __init__(self, layer_ids: list[int], num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        self.index = {layer: i for i, layer in enumerate(layer_ids)}
        shape = (len(layer_ids), num_slots, max_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.index[layer_idx]
        return self.k[i], self.v[i]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class GDNStatePool:
    @staticmethod
    def layer_bytes(num_slots: int, conv_channels: int, conv_kernel: int, num_v_heads: int, key_dim: int,
                    value_dim: int, dtype: torch.dtype) -> int:
        """Bytes one Gated-DeltaNet layer's conv state and float32 recurrent state take."""
        conv = num_slots * conv_channels * max(conv_kernel - 1, 0) * _element_size(dtype)
        return conv + num_slots * num_v_heads * key_dim * value_dim * 4

    def __init__(self, layer_ids: list[int], num_slots: int, conv_channels: int, conv_kernel: int, num_v_heads: int,
                 key_dim: int, value_dim: int, dtype: torch.dtype, device):
        self.index = {layer: i for i, layer in enumerate(layer_ids)}
        n = len(layer_ids)
        self.conv = torch.zeros(n, num_slots, conv_channels, max(conv_kernel - 1, 0), dtype=dtype, device=device)
        # NOTE: the recurrent state is always float32; bf16 accumulation drifts over long sequences
        self.ssm = torch.zeros(n, num_slots, num_v_heads, key_dim, value_dim, dtype=torch.float32, device=device)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.index[layer_idx]
        return self.conv[i], self.ssm[i]

    def reset(self, slots: list[int]) -> None:
        if slots and self.index:
            self.conv[:, slots] = 0
            self.ssm[:, slots] = 0

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.ssm.nbytes
