"""Block-scaled FP8 weights kept 8-bit in memory: their storage, loading and matmul.

A quantized weight (a linear layer's `weight` [out, in], or a stack of experts [E, out, in]) becomes a
float8_e4m3fn parameter with a float32 `<name>_scale_inv` parameter beside it. The checkpoint's scale grid
covers each checkpoint tensor in blocks of `(B0, B1)`, edge blocks partial; a rank's weight is made of row
segments of checkpoint tensors (the q/k/v parts of a fused QKV, a TP shard, ...) and one column range
(`Segment`), wherever they start. The scale parameter keeps, for each checkpoint tensor, the scale rows of
the blocks its segments touch, once each (a block cut by a TP shard is kept whole by both ranks: exact, at the
cost of a scale row), and two small index maps say which scale row and column each local weight row and
column uses. So every block size, every partial block and every TP cut is handled exactly.

`fp8_linear` upcasts a block of weight rows at a time (float32 on CPU, the activations' dtype on CUDA), scales
it and multiplies: the result is the product with the dequantized weight, computed without ever holding more
than one block of rows in high precision."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem.errors import CheckpointError
from tandem.layers.weights import check_shape

FP8_DTYPE = torch.float8_e4m3fn
# NOTE: torch's CPU float8 -> float32 conversion is scalar (2.6x slower than the bit move below, measured on
# a [2048, 2048] weight, 1 thread). The e4m3 sign / exponent / mantissa bits moved into a float16 (exponent
# bias 15 instead of 7) make that float16 exactly the FP8 value / 256, subnormals included; the 256 goes into
# the scale. Only the NaN codes (0x7f, 0xff) do not survive, and the loader refuses them.
HALF_MASK = -16512  # 0xbf80 as int16: keeps the sign (bit 15) and the moved bits, clears the sign extension
HALF_SHIFT = 256.0
CPU_BLOCK_BYTES = 1 << 20  # high-precision bytes of weight upcast at a time on CPU (stays in cache)
CUDA_BLOCK_BYTES = 1 << 28


@dataclass(frozen=True)
class Segment:
    """Local rows [local_start, local_start + rows) are rows [source_start, source_start + rows) of a checkpoint
    tensor with `source_rows` rows (used for columns too: local columns of a tensor of `source_rows` columns)."""

    local_start: int
    rows: int
    source_start: int
    source_rows: int

    def first_block(self, block: int) -> int:
        return self.source_start // block

    def num_blocks(self, block: int) -> int:
        return (self.source_start + self.rows - 1) // block - self.first_block(block) + 1


@dataclass
class BlockScale:
    """What `fp8_linear` needs beside the FP8 values: scales [S, C] and, per local row / column, its scale
    row / column (int32)."""

    scale: torch.Tensor
    row_block: torch.Tensor
    col_block: torch.Tensor
    grid: tuple[int, int] | None = None  # the block size when local row i / column j use scale i // B0, j // B1


def is_fp8(weight: torch.Tensor) -> bool:
    return weight.dtype == FP8_DTYPE


def make_fp8(module: nn.Module, name: str, rows: dict, cols: Segment, block: tuple[int, int],
             stacked: bool = False) -> None:
    """Replace `module.<name>` (a parameter with weight_loader / shard_ids) by FP8 storage of the same shape and
    add `<name>_scale_inv`. rows: checkpoint piece (the parameter's shard id; for a stack of experts the part
    of the expert's shard id: 0 / 1 for gate / up, None for down) -> its row segments."""
    old = getattr(module, name)
    b0, b1 = block
    blocks, start = {}, 0  # piece -> (its first scale row here, the checkpoint block rows it keeps, ascending)
    for part, segments in rows.items():
        kept = sorted({b for seg in segments for b in range(seg.first_block(b0), seg.first_block(b0) + seg.num_blocks(b0))})
        blocks[part] = (start, kept)
        start += len(kept)
    row_block = torch.zeros(old.shape[-2], dtype=torch.int32, device="cpu")
    for part, segments in rows.items():
        first, kept = blocks[part]
        position = torch.full((kept[-1] + 1,), -1, dtype=torch.int32, device="cpu")
        position[kept] = torch.arange(first, first + len(kept), dtype=torch.int32, device="cpu")
        for seg in segments:
            source = torch.arange(seg.source_start, seg.source_start + seg.rows, device="cpu")
            row_block[seg.local_start:seg.local_start + seg.rows] = position[source // b0]
    col_block = torch.arange(cols.source_start, cols.source_start + cols.rows, device="cpu") // b1 - cols.first_block(b1)
    stack = tuple(old.shape[:1]) if stacked else ()
    weight = nn.Parameter(torch.empty(old.shape, dtype=FP8_DTYPE, device=old.device), requires_grad=False)
    weight.weight_loader = _checked_fp8(old.weight_loader)
    scale = nn.Parameter(torch.empty(*stack, start, cols.num_blocks(b1), dtype=torch.float32, device=old.device),
                         requires_grad=False)
    scale.weight_loader = _scale_loader(rows, blocks, cols, block, stacked)
    weight.shard_ids = scale.shard_ids = old.shard_ids
    setattr(module, name, weight)
    module.register_parameter(f"{name}_scale_inv", scale)
    module.register_buffer(f"{name}_row_block", row_block.to(old.device), persistent=False)
    module.register_buffer(f"{name}_col_block", col_block.to(old.device, torch.int32), persistent=False)
    # NOTE: the weight carries its scales so that `linear(x, weight)` needs no module; the tensors are the
    # module's own parameter and buffers (built on their device, never moved afterwards)
    plain = (torch.equal(row_block, (torch.arange(old.shape[-2], device="cpu") // b0).to(torch.int32))
             and torch.equal(col_block, torch.arange(cols.rows, device="cpu") // b1))
    weight.block_scale = BlockScale(scale, getattr(module, f"{name}_row_block"), getattr(module, f"{name}_col_block"),
                                    block if plain else None)


def _checked_fp8(loader: Callable) -> Callable:
    def load(param, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.dtype != FP8_DTYPE:
            raise CheckpointError(f"stored as {str(loaded.dtype).removeprefix('torch.')}, but quantization_config "
                                  f"makes this module float8_e4m3fn (list it in modules_to_not_convert?)")
        if bool(((loaded.view(torch.uint8) & 0x7F) == 0x7F).any()):
            raise CheckpointError("the FP8 weight holds NaN")
        loader(param, loaded, shard_id)

    return load


def _scale_loader(rows: dict, blocks: dict, cols: Segment, block: tuple[int, int], stacked: bool) -> Callable:
    b0, b1 = block

    def load(param, loaded: torch.Tensor, shard_id=None) -> None:
        expert, part = (shard_id if isinstance(shard_id, tuple) else (shard_id, None)) if stacked else (None, shard_id)
        if stacked and expert is None:
            raise CheckpointError("FP8 experts must be stored per expert (experts.{e}.*_proj.weight_scale_inv)")
        if part not in rows:
            raise CheckpointError(f"no FP8 block layout for checkpoint piece {part!r} of this parameter")
        expected = (-(-rows[part][0].source_rows // b0), -(-cols.source_rows // b1))
        check_shape(expected, loaded, f"block scales of {b0}x{b1} blocks")
        first, kept = blocks[part]
        dest = param.data if expert is None else param.data[expert]
        c0, cn = cols.first_block(b1), cols.num_blocks(b1)
        picked = loaded[kept[0]:kept[-1] + 1, c0:c0 + cn][[b - kept[0] for b in kept]]
        dest[first:first + len(kept)].copy_(picked)

    return load


def expert_weight(stack: torch.Tensor, expert: int) -> torch.Tensor:
    """`stack[expert]`, carrying its block scales when the stack is FP8."""
    weight = stack[expert]
    if is_fp8(stack):
        scales = stack.block_scale
        weight.block_scale = BlockScale(scales.scale[expert], scales.row_block, scales.col_block, scales.grid)
    return weight


def dequantize_rows(weight: torch.Tensor, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, end) of a 2-D FP8 weight times their block scales, in `dtype`."""
    if weight.device.type == "cpu":
        bits = weight[start:end].view(torch.int8).to(torch.int16)  # sign-extended
        bits <<= 7
        bits &= HALF_MASK
        values, factor = bits.view(torch.float16).to(torch.float32), HALF_SHIFT
    else:
        values, factor = weight[start:end].to(torch.float32), 1.0
    return _scale_rows(values, weight.block_scale, start, factor).to(dtype)


def _scale_rows(values: torch.Tensor, scales: BlockScale, start: int, factor: float) -> torch.Tensor:
    """values [rows, in] (weight rows from `start`) times their blocks' scales and `factor`, in place."""
    rows, cols = values.shape
    if scales.grid is not None and cols % scales.grid[1] == 0 and start % scales.grid[0] == 0:
        b0, b1 = scales.grid  # broadcast each scale over its block: no scale matrix of the weight's size
        scale = scales.scale[start // b0:-(-(start + rows) // b0)] * factor  # [row blocks, C]
        full = rows // b0 * b0
        if full:
            values[:full].view(full // b0, b0, cols // b1, b1).mul_(scale[:full // b0, None, :, None])
        if full < rows:
            values[full:].view(rows - full, cols // b1, b1).mul_(scale[full // b0][None, :, None])
        return values
    scale = scales.scale.index_select(0, scales.row_block[start:start + rows]).index_select(1, scales.col_block)
    return values.mul_(scale.mul_(factor))


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequantized(weight)^T (+ bias), upcasting a block of weight rows at a time."""
    on_cpu = x.device.type == "cpu"
    dtype = torch.float32 if on_cpu else x.dtype
    out_features, in_features = weight.shape
    rows = max(64, (CPU_BLOCK_BYTES if on_cpu else CUDA_BLOCK_BYTES) // (4 * in_features))
    if weight.block_scale.grid is not None:  # whole row blocks: each takes the broadcast path of _scale_rows
        b0 = weight.block_scale.grid[0]
        rows = max(b0, rows // b0 * b0)
    xc = x.to(dtype)
    if out_features <= rows:
        out = F.linear(xc, dequantize_rows(weight, 0, out_features, dtype))
    else:
        out = torch.empty(*x.shape[:-1], out_features, dtype=dtype, device=x.device)
        for start in range(0, out_features, rows):
            end = min(start + rows, out_features)
            out[..., start:end] = F.linear(xc, dequantize_rows(weight, start, end, dtype))
    if bias is not None:
        out += bias.to(dtype)
    return out.to(x.dtype)
