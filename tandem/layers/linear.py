"""Linear layers that know their tensor-parallel layout and shard checkpoint tensors on load.

Column-parallel layers split the output features across TP ranks (no communication); row-parallel
layers split the input features and all-reduce the partial sums. Fused layers (merged column, QKV)
load their pieces from separate checkpoint tensors, identified by `shard_id`. Every layer takes the
rank's TP group (`GroupInfo`) as its first argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from tandem.errors import CheckpointError, ConfigError
from tandem.layers.matmul import linear
from tandem.layers.weights import check_shape, load_parts, new_param, shard_of, sharded_loader
from tandem.parallel.comm import tp_all_reduce
from tandem.parallel.layout import GroupInfo


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ConfigError(f"{what} ({numerator}) is not divisible by tp_size ({denominator})")
    return numerator // denominator


class _LocalLinear(nn.Module):
    """A linear layer whose output needs no communication: y = x W^T (+ b) with this rank's weight."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ReplicatedLinear(_LocalLinear):
    """The same full weight on every TP rank."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = new_param(out_features, in_features)
        self.bias = new_param(out_features) if bias else None


class ColumnParallelLinear(_LocalLinear):
    """Output features split evenly across TP ranks; each rank returns its slice of the output."""

    def __init__(self, tp: GroupInfo, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.tp = tp
        self.out_local = divide(out_features, tp.size, "output features")
        self.weight = new_param(self.out_local, in_features, weight_loader=sharded_loader(0, tp))
        self.bias = new_param(self.out_local, weight_loader=sharded_loader(0, tp)) if bias else None


class MergedColumnParallelLinear(_LocalLinear):
    """Several column-parallel outputs fused into one matmul (e.g. gate_proj + up_proj).

    Each part is split across TP ranks on its own, so a rank holds [part0 slice, part1 slice, ...].
    shard_id = index of the part, or None for a checkpoint tensor that already holds all parts."""

    def __init__(self, tp: GroupInfo, in_features: int, output_sizes: Sequence[int], bias: bool = False):
        super().__init__()
        self.tp = tp
        self.full_sizes = list(output_sizes)
        self.local_sizes = [divide(size, tp.size, "output features") for size in output_sizes]
        shard_ids = tuple(range(len(output_sizes)))
        self.weight = new_param(sum(self.local_sizes), in_features, weight_loader=self._load, shard_ids=shard_ids)
        self.bias = new_param(sum(self.local_sizes), weight_loader=self._load, shard_ids=shard_ids) if bias else None

    def _load(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        load_parts(param, loaded, shard_id, self.full_sizes, self.tp)


class QKVParallelLinear(_LocalLinear):
    """Fused q/k/v projection split by heads. When tp_size exceeds the number of KV heads, KV heads are
    replicated: rank r uses KV head r // (tp_size // num_kv_heads).

    q_width is the per-head width of q_proj's output (2*head_dim for Qwen3.5, whose q_proj also emits the
    per-head output gate)."""

    def __init__(self, tp: GroupInfo, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, q_width: int | None = None):
        super().__init__()
        self.tp = tp
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
        tp = self.tp
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


class RowParallelLinear(nn.Module):
    """Input features split across TP ranks; partial outputs are all-reduced, then the bias is added once."""

    def __init__(self, tp: GroupInfo, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.tp = tp
        self.in_local = divide(in_features, tp.size, "input features")
        self.weight = new_param(out_features, self.in_local, weight_loader=sharded_loader(1, tp))
        self.bias = new_param(out_features) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = tp_all_reduce(linear(x, self.weight), self.tp)
        return out + self.bias if self.bias is not None else out
