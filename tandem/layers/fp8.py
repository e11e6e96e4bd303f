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
    weight = nn.Parameter(torch.empty(old.shape, dtype=FP8_DTYPE), requires_grad=False)
    weight.weight_loader = _checked_fp8(old.weight_loader)
    scale = nn.Parameter(torch.empty(*stack, start, cols.num_blocks(b1), dtype=torch.float32), requires_grad=False)
    scale.weight_loader = _scale_loader(rows, blocks, cols, block, stacked)
    weight.shard_ids = scale.shard_ids = old.shard_ids
    setattr(module, name, weight)
    module.register_parameter(f"{name}_scale_inv", scale)
    module.register_buffer(f"{name}_row_block", row_block.to(old.device), persistent=False)
    module.register_buffer(f"{name}_col_block", col_block.to(old.device, torch.int32), persistent=False)
    # NOTE: the weight carries its scales so that `linear(x, weight)` needs no module; the tensors are the
    # module's own parameter and buffers (built on their device, never moved afterwards)
    weight.block_scale = BlockScale(scale, getattr(module, f"{name}_row_block"), getattr(module, f"{name}_col_block"))


def _checked_fp8(loader: Callable) -> Callable:
    def load(param, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.dtype != FP8_DTYPE:
            raise CheckpointError(f"stored as {str(loaded.dtype).removeprefix('torch.')}, but quantization_config "
                                  f"makes this module float8_e4m3fn (list it in modules_to_not_convert?)")
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
        weight.block_scale = BlockScale(scales.scale[expert], scales.row_block, scales.col_block)
    return weight


def dequantize_rows(weight: torch.Tensor, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, end) of a 2-D FP8 weight times their block scales, in `dtype`."""
    scales = weight.block_scale
    rows = scales.scale.index_select(0, scales.row_block[start:end]).index_select(1, scales.col_block)
    return (weight[start:end].to(torch.float32) * rows).to(dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequantized(weight)^T (+ bias), upcasting a block of weight rows at a time."""
    on_cpu = x.device.type == "cpu"
    dtype = torch.float32 if on_cpu else x.dtype
    out_features, in_features = weight.shape
    rows = max(64, (CPU_BLOCK_BYTES if on_cpu else CUDA_BLOCK_BYTES) // (dtype.itemsize * in_features))
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
