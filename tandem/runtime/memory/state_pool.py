"""The Gated-DeltaNet (linear-attention) state slot pool of one stage.

A slot holds, for every linear-attention layer of the stage, the causal-conv state
[conv_kernel - 1, conv_channels] (the last inputs, oldest first, channels innermost) in the model dtype and the
recurrent state [v_heads, key_dim, value_dim] in float32. Running requests own a slot each; the radix prefix
cache owns the slots holding snapshots of the state at cached prefix ends (`copy` takes and restores them).
Which slot is whose is decided by the driver (`IdAllocator`), not here."""

from __future__ import annotations

import torch


class LinearStatePool:
    @staticmethod
    def bytes_per_slot(num_linear_layers: int, conv_channels: int, conv_kernel: int, v_heads: int, key_dim: int,
                       value_dim: int, dtype: torch.dtype) -> int:
        """Bytes one slot takes over the stage's linear-attention layers."""
        conv = conv_channels * max(conv_kernel - 1, 0) * dtype.itemsize
        recurrent = v_heads * key_dim * value_dim * torch.float32.itemsize
        return num_linear_layers * (conv + recurrent)

    def __init__(self, layer_ids: list[int], num_slots: int, conv_channels: int, conv_kernel: int, v_heads: int,
                 key_dim: int, value_dim: int, dtype: torch.dtype, device, zero_fill: bool = True):
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        self.num_slots = num_slots
        self.index = {layer: i for i, layer in enumerate(layer_ids)}
        n = len(layer_ids)
        # without zero_fill, slots are zeroed by `reset` (or overwritten by `copy`) when a request takes them
        make = torch.zeros if zero_fill else torch.empty
        self.conv = make(n, num_slots, max(conv_kernel - 1, 0), conv_channels, dtype=dtype, device=device)
        # NOTE: the recurrent state is always float32; bf16 accumulation drifts over long sequences
        self.recurrent = make(n, num_slots, v_heads, key_dim, value_dim, dtype=torch.float32, device=device)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv and recurrent state of one global layer index: [slots, K-1, C] and [slots, Hv, Dk, Dv] views."""
        i = self.index[layer_idx]
        return self.conv[i], self.recurrent[i]

    def _slot_index(self, slots) -> torch.Tensor:
        index = torch.as_tensor(list(slots), dtype=torch.long)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_slots):
            raise IndexError(f"state slots {index.tolist()} out of range [0, {self.num_slots})")
        return index.to(self.conv.device)

    def reset(self, slots) -> None:
        """Zero the states of `slots` (a request starting from an empty prefix)."""
        index = self._slot_index(slots)
        if index.numel() and self.index:
            self.conv[:, index] = 0
            self.recurrent[:, index] = 0

    def copy(self, src_slots, dst_slots) -> None:
        """dst_slots[i] <- src_slots[i] in every layer: snapshot a request's state into a cache slot, or resume a
        request from a cached snapshot. The sources are read before any destination is written."""
        src, dst = self._slot_index(src_slots), self._slot_index(dst_slots)
        if src.numel() != dst.numel():
            raise ValueError(f"copy of {src.numel()} source slots into {dst.numel()} destination slots")
        if len(set(dst.tolist())) != dst.numel():
            raise ValueError(f"destination slots repeat: {dst.tolist()}")
        if src.numel() and self.index:
            self.conv[:, dst] = self.conv[:, src]
            self.recurrent[:, dst] = self.recurrent[:, src]

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.recurrent.nbytes
