"""Weight-only int8 / int4 quantization of a stage's linear layers at load (`--torchao-config int8wo |
int4wo-<group>`, SGLang's flag and values), for memory-bound CPU decode.

Which linears: SGLang's filter, every parallel linear with `proj` in its name (attention q/k/v and o, MLP and
shared-expert gate/up/down, Gated DeltaNet in_proj_qkv / in_proj_z / out_proj), except Gated DeltaNet's
in_proj_a / in_proj_b (a few value-head rows each, kept as the FP8 releases keep them). Embeddings, the LM
head, norms, the MoE router, the shared-expert gate and the stacked MoE experts stay in the model dtype.
Each rank quantizes its own TP shard after its weights are loaded; the quantized module takes the linear's
`weight` attribute, and `layers.matmul.linear` calls it.

Formats (torchao's): int8wo is symmetric per output channel, w ~ q * scale (q in [-127, 127]); int4wo-g is
asymmetric per group of g input features, w ~ (q - 8) * scale + zero (q in [0, 15], zero = min + 8 * scale),
int8 scales stored in the model dtype, int4 scales and zeros in bf16 (the int4 kernel's). Quantization rounds
with those stored (rounded) scales, so every path computes with exactly the same weight values.

Kernels. Where `layers/int8_kernel.py` runs (an AVX2 CPU with a C compiler), an int8 weight whose sizes allow
it is stored in that module's interleaved layout (the same bytes), and products of up to `PACKED_KERNEL_MAX_ROWS`
rows take its kernel: 2.6-2.8x torch's `_weight_int8pack_mm` at one row on cold [8192 | 2048, 1024] weights,
the weight streamed once in order, and still ahead of the block path at 32 rows. Elsewhere bf16 products of
up to `INT8_KERNEL_MAX_ROWS` rows take `_weight_int8pack_mm` (at one row it
converts and scales every weight before its FMA, compute-bound on an AVX2 core at about 3 G weights/s:
bench/results/profile.md, "Weight-only decode"; its float32 / float16 inputs take a slow reference loop, so
those dtypes take the block path). Larger products take the float32 block path (the int8 weight converted a
block of rows at a time, as `matmul`'s upcast path does for bf16), which reuses each converted block across the
rows. `_weight_int4pack_mm_for_cpu` has AVX2/AVX512 code for bf16 activations only: other dtypes are rounded to
bf16 around it. torchao itself adds no faster CPU kernel for these formats (its int8 weight-only CPU path
converts the whole weight to the activation dtype per call), so it is not a dependency. The row thresholds are
constants, not per-process measurements, so that every rank and every run takes the same path for the same step
(pp runs stay bit-identical to pp=1)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem.config import WeightOnlySpec
from tandem.errors import ConfigError
from tandem.layers import int8_kernel
from tandem.layers.linear import RowParallelLinear, _LocalLinear

logger = logging.getLogger("tandem")

INT8_KERNEL_MAX_ROWS = 8  # torch's int8 kernel up to this many rows, the float32 block path above (crossover measured)
PACKED_KERNEL_MAX_ROWS = 32  # int8_kernel's: 2.3x the block path at 16 rows, 1.1-1.5x at 32 ([8192 | 1024, 1024 | 4096])
BLOCK_BYTES = 1 << 20  # float32 bytes of weight converted at a time on the block path
KEEP_UNQUANTIZED = ("in_proj_a", "in_proj_b")


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _blockwise(x32: torch.Tensor, n: int, k: int, block_fn) -> torch.Tensor:
    """x32 [rows, k] times the [n, k] weight whose rows [s, s+r) `block_fn(s, r)` returns in float32."""
    rows = max(64, BLOCK_BYTES // (4 * k) // 4 * 4)  # a multiple of 4: whole groups of a packed int8 weight
    out = torch.empty(x32.shape[0], n, dtype=torch.float32, device=x32.device)
    for start in range(0, n, rows):
        size = min(rows, n - start)
        out[:, start:start + size] = F.linear(x32, block_fn(start, size))
    return out


class Int8WeightOnly(nn.Module):
    """An [out, in] weight as int8 with one scale per output channel (in the model dtype)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(weight.dtype)
        q = torch.round(w / scale.float().unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        self.out_features, self.in_features = q.shape
        # the interleaved layout where int8_kernel runs (the same bytes), else [out, in]
        self.packed = int8_kernel.available() and int8_kernel.packable(*q.shape)
        self.qweight = _param(int8_kernel.pack(q) if self.packed else q)
        self.scales = _param(scale)  # [out]
        self.register_buffer("scales32", scale.float(), persistent=False)  # what int8_kernel takes

    def int8_rows(self, start: int, count: int) -> torch.Tensor:
        """Rows [start, start + count) of the [out, in] int8 weight, whatever its layout."""
        if self.packed:
            return int8_kernel.unpack_rows(self.qweight, start, count)
        return self.qweight[start:start + count]

    def dequantize(self) -> torch.Tensor:
        return self.int8_rows(0, self.out_features).float() * self.scales.float().unsqueeze(1)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [rows, in]
        rows = x2.shape[0]
        if self.packed and rows <= PACKED_KERNEL_MAX_ROWS:
            out = int8_kernel.int8_packed_matmul(x2.float().contiguous(), self.qweight, self.scales32).to(x.dtype)
        # torch's kernel reads past the weight when out % 4 is 2 or 3 (torch 2.13: a segfault at [6 | 1026, 1000])
        elif rows <= INT8_KERNEL_MAX_ROWS and x.dtype == torch.bfloat16 and self.out_features % 4 == 0:
            out = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scales)
        else:
            n, k = self.out_features, self.in_features
            out = _blockwise(x2.float(), n, k, lambda s, r: self.int8_rows(s, r).float())
            out = (out * self.scales.float()).to(x.dtype)
        if bias is not None:
            out = out + bias
        return out.reshape(*shape[:-1], out.shape[-1])


class Int4WeightOnly(nn.Module):
    """An [out, in] weight as packed int4 (torch's CPU int4pack layout) with a scale and a zero per group of
    `group_size` input features and output channel, `scales_and_zeros` [in / group, out, 2] in bf16."""

    def __init__(self, weight: torch.Tensor, group_size: int):
        super().__init__()
        n, k = weight.shape
        self.group_size = group_size
        groups = weight.detach().float().reshape(n, k // group_size, group_size)  # [out, groups, group]
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
        # bf16 scales and zeros whatever the model dtype: the kernel takes them in its activation dtype, bf16
        scale = ((hi - lo) / 15).clamp(min=1e-6).to(torch.bfloat16)
        zero = (lo + 8 * scale.float()).to(torch.bfloat16)
        base = zero.float() - 8 * scale.float()  # the value q = 0 stands for
        q = torch.round((groups - base.unsqueeze(-1)) / scale.float().unsqueeze(-1)).clamp(0, 15)
        q = q.to(torch.int32).reshape(n, k)
        self.qweight = _param(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))  # [out, in / 2] uint8
        self.scales_and_zeros = _param(torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous())
        self.out_features = n

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()  # [rows, in]
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.scales_and_zeros)
        out = out.to(x.dtype)
        if bias is not None:
            out = out + bias
        return out.reshape(*shape[:-1], self.out_features)


@dataclass
class QuantizeSummary:
    linears: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    def line(self, label: str, spec: WeightOnlySpec) -> str:
        return (f"{label} {spec.name}: {self.linears} linears {self.bytes_before / 1e6:.1f} MB -> "
                f"{self.bytes_after / 1e6:.1f} MB (embeddings, LM head, norms, router and MoE experts unchanged)")


def _quantizable(name: str, module: nn.Module) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return ("proj" in leaf and leaf not in KEEP_UNQUANTIZED
            and isinstance(module, (_LocalLinear, RowParallelLinear))
            and isinstance(module.weight, torch.Tensor))


def _check_group(k: int, spec: WeightOnlySpec, name: str) -> None:
    if spec.bits == 4 and k % spec.group_size:
        raise ConfigError(f"{spec.name}: {name} has {k} input features per rank, not a multiple of the group "
                          f"size {spec.group_size}; choose a group size that divides it")


def quantize_module(weight: torch.Tensor, spec: WeightOnlySpec, name: str) -> nn.Module:
    _check_group(weight.shape[1], spec, name)
    if spec.bits == 8:
        return Int8WeightOnly(weight)
    return Int4WeightOnly(weight, spec.group_size)


def quantized_bytes(out_features: int, in_features: int, dtype: torch.dtype, spec: WeightOnlySpec,
                    name: str = "") -> int:
    """Bytes of an [out, in] weight once quantized: int8 1 byte per element plus one model-dtype scale per
    output channel; int4 half a byte per element plus a bf16 scale and zero per group and output channel."""
    _check_group(in_features, spec, name)
    if spec.bits == 8:
        return out_features * in_features + out_features * dtype.itemsize
    return out_features * in_features // 2 + out_features * (in_features // spec.group_size) * 2 * 2


def weight_bytes(module: nn.Module, spec: WeightOnlySpec | None) -> int:
    """Parameter bytes of `module` (loaded, or built on meta) as `quantize_linears_(module, spec)` leaves them."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    if spec is None:
        return total
    for name, m in module.named_modules():
        if _quantizable(name, m):
            w = m.weight
            total += quantized_bytes(w.shape[0], w.shape[1], w.dtype, spec, name) - w.numel() * w.element_size()
    return total


def quantize_linears_(model: nn.Module, spec: WeightOnlySpec | None, label: str = "") -> QuantizeSummary:
    """Replace the weight of every quantizable linear of `model` (loaded) by its int8 / int4 form, in place."""
    summary = QuantizeSummary()
    if spec is None:
        return summary
    targets = [(name, m) for name, m in model.named_modules() if _quantizable(name, m)]
    for name, module in targets:
        weight = module.weight
        if weight.device.type != "cpu":
            raise ConfigError(f"{spec.name} is implemented for device='cpu' only ({name} is on {weight.device})")
        quantized = quantize_module(weight.data, spec, name)
        del module.weight
        module.weight = quantized
        summary.linears += 1
        summary.bytes_before += weight.numel() * weight.element_size()
        summary.bytes_after += sum(p.numel() * p.element_size() for p in quantized.parameters())
    logger.info(summary.line(label, spec))
    return summary
