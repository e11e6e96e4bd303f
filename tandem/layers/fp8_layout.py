"""Where each parallel layer's local weight rows and columns come from in the checkpoint tensors (`Segment`s),
and `quantize_module`, which turns a layer's weights into block-scaled FP8 storage (`tandem.layers.fp8`).

The segments restate each layer's own `weight_loader` (which slice of which checkpoint tensor a rank copies
where); `tests/test_fp8.py` checks them against the loaders by loading dequantized weights."""

from __future__ import annotations

import torch.nn as nn

from tandem.errors import ConfigError
from tandem.layers.fp8 import Segment, make_fp8
from tandem.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from tandem.layers.moe import StackedExperts

LINEAR_TYPES = (ReplicatedLinear, ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                RowParallelLinear)


def _whole(size: int) -> Segment:
    return Segment(0, size, 0, size)


def linear_rows(module: nn.Module, fused: bool) -> dict:
    """shard id -> row segments of a linear layer's weight. fused: a multi-part layer loaded from one
    checkpoint tensor holding every part (shard id None), e.g. Gated DeltaNet's in_proj_qkv."""
    out_rows = module.weight.shape[0]
    if isinstance(module, ColumnParallelLinear):
        return {None: (Segment(0, out_rows, module.tp.rank * out_rows, out_rows * module.tp.size),)}
    if isinstance(module, MergedColumnParallelLinear):
        rank, full, local = module.tp.rank, module.full_sizes, module.local_sizes
        segments = [Segment(sum(local[:p]), local[p], (sum(full[:p]) if fused else 0) + rank * local[p],
                            sum(full) if fused else full[p]) for p in range(len(full))]
        return {None: tuple(segments)} if fused else {p: (seg,) for p, seg in enumerate(segments)}
    if isinstance(module, QKVParallelLinear):
        if fused:
            raise ConfigError("a fused qkv checkpoint tensor cannot be FP8 here: FP8 checkpoints store q/k/v apart")
        q, kv, kv_start = module.q_size, module.kv_size, module.kv_head_start * module.head_dim
        kv_full = module.total_kv_heads * module.head_dim
        return {"q": (Segment(0, q, module.tp.rank * q, q * module.tp.size),),
                "k": (Segment(q, kv, kv_start, kv_full),), "v": (Segment(q + kv, kv, kv_start, kv_full),)}
    return {None: (_whole(out_rows),)}  # replicated and row-parallel layers keep every output row


def linear_cols(module: nn.Module) -> Segment:
    in_cols = module.weight.shape[1]
    if isinstance(module, RowParallelLinear):
        return Segment(0, in_cols, module.tp.rank * in_cols, in_cols * module.tp.size)
    return _whole(in_cols)


def quantize_module(module: nn.Module, block: tuple[int, int], fused: bool = False) -> None:
    """Make a linear layer's or an expert stack's weights FP8 (called right after the module is built)."""
    if isinstance(module, StackedExperts):
        tp, inter = module.tp, module.local_inter
        gate_up = {j: (Segment(j * inter, inter, tp.rank * inter, module.intermediate_size),) for j in (0, 1)}
        make_fp8(module, "gate_up_proj", gate_up, _whole(module.hidden_size), block, stacked=True)
        make_fp8(module, "down_proj", {None: (_whole(module.hidden_size),)},
                 Segment(0, inter, tp.rank * inter, module.intermediate_size), block, stacked=True)
    elif isinstance(module, LINEAR_TYPES):
        make_fp8(module, "weight", linear_rows(module, fused), linear_cols(module), block)
    else:
        raise ConfigError(f"{type(module).__name__} has no FP8 form")
