"""`linear()`: F.linear, except for half-precision weights on CPUs without fast native bf16/fp16 GEMM.

There, torch's bf16 GEMM is several times slower than upcasting both operands to float32 and using the
fp32 GEMM (measured on AVX2 machines: 3-10x). The weights stay in half precision in memory; the product
is computed in float32 and rounded back, which is what a native kernel with fp32 accumulation does.
Weights are upcast a block of rows at a time so each fp32 block stays in cache (a whole LM head upcast at
once would stream hundreds of MB through memory per step)."""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F


@functools.cache
def upcast_is_faster(dtype: torch.dtype) -> bool:
    """Decided once per process and dtype by timing both paths on a representative product."""
    x = torch.randn(32, 1024).to(dtype)
    w = torch.randn(1024, 1024).to(dtype)

    def timed(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(3):
            fn()
        return time.perf_counter() - start

    native = timed(lambda: F.linear(x, w))
    upcast = timed(lambda: _upcast_linear(x, w, None))
    return upcast < 0.8 * native


BLOCK_BYTES = 1 << 20  # fp32 bytes of weight upcast at a time


def _upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    x32 = x.float()
    rows = max(64, BLOCK_BYTES // (4 * weight.shape[1]))
    if weight.shape[0] <= rows:
        out = F.linear(x32, weight.float())
    else:
        out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32, device=x.device)
        for start in range(0, weight.shape[0], rows):
            out[..., start:start + rows] = F.linear(x32, weight[start:start + rows].float())
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if weight.dtype in (torch.bfloat16, torch.float16) and weight.device.type == "cpu" and upcast_is_faster(weight.dtype):
        return _upcast_linear(x, weight, bias)
    return F.linear(x, weight, bias)
