"""Rotary position embeddings (neox layout): full or partial rotary dims, and every scaling type
transformers knows (llama3, yarn, linear, ...), whose inverse frequencies we take from transformers.

Qwen3.5's multimodal rope (mRoPE) uses the same position for its three sections on text-only input,
which makes it identical to 1-D rope over `rotary_dim` dims; that is what this module computes."""

from __future__ import annotations

import torch
import torch.nn as nn


def _inv_freq(rotary_dim: int, rope: dict, hf_config) -> tuple[torch.Tensor, float]:
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        base = float(rope["rope_theta"])
        return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rope: dict, partial_rotary_factor: float = 1.0, hf_config=None):
        super().__init__()
        self.rotary_dim = int(head_dim * partial_rotary_factor)
        inv_freq, self.scaling = _inv_freq(self.rotary_dim, rope, hf_config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]  # [T, rotary_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, rotary_dim]
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos_sin) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hk, D]; cos_sin from `cos_sin(positions)`."""
        cos, sin = (t.unsqueeze(1) for t in cos_sin)  # [T, 1, rotary_dim]
        return self._apply(q, cos, sin), self._apply(k, cos, sin)

    def _apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        rot = rot * cos + _rotate_half(rot) * sin
        return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot
