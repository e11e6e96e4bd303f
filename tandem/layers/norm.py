"""RMS norms: the plain `w * norm(x)` form, Qwen3.5's zero-centred `(1 + w) * norm(x)` form (both with an
optional fused residual add), and the gated RMSNorm of Gated DeltaNet. Statistics are in float32."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem.layers.weights import new_param


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """zero_centred=False: w * norm(x) (weight applied in the input dtype, as Llama);
    zero_centred=True: (1 + w) * norm(x) computed in float32 (as Qwen3.5)."""

    def __init__(self, dim: int, eps: float = 1e-6, zero_centred: bool = False):
        super().__init__()
        self.eps = eps
        self.zero_centred = zero_centred
        self.weight = new_param(dim)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.zero_centred:
            return (_normalize(x, self.eps) * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * _normalize(x, self.eps).to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With residual: returns (norm(x + residual), x + residual)."""
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class GatedRMSNorm(nn.Module):
    """Gated DeltaNet output norm: w * norm(x) * silu(gate), over the last dim (one value head)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = new_param(dim)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        out = self.weight * _normalize(x, self.eps).to(x.dtype)
        return (out * F.silu(gate.float())).to(x.dtype)
