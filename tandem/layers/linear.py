"""Linear layers that know their tensor-parallel layout and shard checkpoint tensors on load.

Column-parallel layers split the output features across TP ranks (no communication); row-parallel
layers split the input features and all-reduce the partial sums. Fused layers (merged column, QKV)
load their pieces from separate checkpoint tensors, identified by `shard_id`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from tandem.layers.matmul import linear
from tandem.errors import CheckpointError, ConfigError
from tandem.layers.weights import check_shape, new_param, shard_of, sharded_loader
from tandem.parallel.comm import tp_all_reduce
from tandem.parallel.state import get_tp


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ConfigError(f"{what} ({numerator}) is not divisible by tp_size ({denominator})")
    return numerator // denominator


class ReplicatedLinear(nn.Module):
    """The same full weight on every TP rank."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = new_param(out_features, in_features)
        self.bias = new_param(out_features) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ColumnParallelLinear(nn.Module):
    """Output features split evenly across TP ranks; each rank returns its slice of the output."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        tp = get_tp()
        self.out_local = divide(out_features, tp.size, "output features")
        self.weight = new_param(self.out_local, in_features, weight_loader=sharded_loader(0))
        self.bias = new_param(self.out_local, weight_loader=sharded_loader(0)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(nn.Module):
    """Several column-parallel outputs fused into one matmul (e.g. gate_proj + up_proj).

    Each part is split across TP ranks on its own, so a rank holds [part0 slice, part1 slice, ...].
    shard_id = index of the part, or None for a checkpoint tensor that already holds all parts."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool = False):
        super().__init__()
        tp = get_tp()
        self.full_sizes = list(output_sizes)
        self.local_sizes = [divide(size, tp.size, "output features") for size in output_sizes]
        shard_ids = tuple(range(len(output_sizes)))
        self.weight = new_param(sum(self.local_sizes), in_features, weight_loader=self._load, shard_ids=shard_ids)
        self.bias = new_param(sum(self.local_sizes), weight_loader=self._load, shard_ids=shard_ids) if bias else None

    def _local_range(self, index: int) -> tuple[int, int]:
        start = sum(self.local_sizes[:index])
        return start, self.local_sizes[index]

    def _load(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        tp = get_tp()
        if shard_id is None:
            expected = (sum(self.full_sizes), *param.shape[1:])
            if tuple(loaded.shape) != expected:
                raise CheckpointError(
                    f"shape mismatch: checkpoint tensor has shape {tuple(loaded.shape)}, the model expects {expected}"
                )
            parts = torch.split(loaded, self.full_sizes, dim=0)
        else:
            parts = {shard_id: loaded}
        items = enumerate(parts) if shard_id is None else parts.items()
        for index, part in items:
            start, size = self._local_range(index)
            check_shape((self.full_sizes[index], *param.shape[1:]), part)
            param.data.narrow(0, start, size).copy_(shard_of(part, 0, tp.rank, tp.size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class QKVParallelLinear(nn.Module):
    """Fused q/k/v projection split by heads. When tp_size exceeds the number of KV heads, KV heads are
    replicated: rank r uses KV head r // (tp_size // num_kv_heads).

    q_width is the per-head width of q_proj's output (2*head_dim for Qwen3.5, whose q_proj also emits the
    per-head output gate)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 q_width: int | None = None):
        super().__init__()
        tp = get_tp()
        self.head_dim = head_dim
        self.q_width = q_width or head_dim
        self.total_kv_heads = num_kv_heads
        self.num_heads = divide(num_heads, tp.size, "attention heads")
        if tp.size >= num_kv_heads:
            if tp.size % num_kv_heads:
                raise ConfigError(f"tp_size {tp.size} must be a multiple of the {num_kv_heads} KV heads")
            self.num_kv_heads = 1
            self.kv_head_start = tp.rank // (tp.size // num_kv_heads)
        else:
            self.num_kv_heads = divide(num_kv_heads, tp.size, "KV heads")
            self.kv_head_start = tp.rank * self.num_kv_heads
        self.q_size = self.num_heads * self.q_width
        self.kv_size = self.num_kv_heads * head_dim
        out = self.q_size + 2 * self.kv_size
        shard_ids = ("q", "k", "v")
        self.weight = new_param(out, hidden_size, weight_loader=self._load, shard_ids=shard_ids)
        self.bias = new_param(out, weight_loader=self._load, shard_ids=shard_ids) if bias else None

    def _load(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        tp = get_tp()
        rows = param.shape[1:]
        if shard_id == "q":
            check_shape((self.q_size * tp.size, *rows), loaded, "q_proj")
            start, size, part = 0, self.q_size, shard_of(loaded, 0, tp.rank, tp.size)
        elif shard_id in ("k", "v"):
            check_shape((self.total_kv_heads * self.head_dim, *rows), loaded, f"{shard_id}_proj")
            start = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size = self.kv_size
            part = loaded.narrow(0, self.kv_head_start * self.head_dim, self.kv_size)
        else:
            raise CheckpointError(f"QKV projection got unknown shard {shard_id!r}")
        param.data.narrow(0, start, size).copy_(part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Input features split across TP ranks; partial outputs are all-reduced, then the bias is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        tp = get_tp()
        self.in_local = divide(in_features, tp.size, "input features")
        self.weight = new_param(out_features, self.in_local, weight_loader=sharded_loader(1))
        self.bias = new_param(out_features) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = tp_all_reduce(linear(x, self.weight))
        return out + self.bias if self.bias is not None else out
