"""Parameter creation and the load bookkeeping attached to every parameter.

Each parameter carries `weight_loader(param, tensor, shard_id)` and `shard_ids`: the pieces that must
all be written before the parameter is complete (e.g. ("q", "k", "v") for a fused QKV weight). A
checkpoint tensor loaded with `shard_id=None` into a multi-piece parameter covers every piece.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from tandem.errors import CheckpointError
from tandem.parallel.layout import GroupInfo


def new_param(*shape: int, weight_loader: Callable | None = None, shard_ids: Iterable = (None,)) -> nn.Parameter:
    """An uninitialised parameter in the default dtype/device; the loader must fill it."""
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = weight_loader or default_weight_loader
    param.shard_ids = tuple(shard_ids)
    return param


def check_shape(expected, loaded: torch.Tensor, what: str = "") -> None:
    """expected: a tensor or a shape."""
    expected = tuple(expected.shape) if isinstance(expected, torch.Tensor) else tuple(expected)
    if expected != tuple(loaded.shape):
        raise CheckpointError(
            f"shape mismatch{(' for ' + what) if what else ''}: checkpoint tensor has shape "
            f"{tuple(loaded.shape)}, the model expects {expected}"
        )


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
    check_shape(param, loaded)
    param.data.copy_(loaded)


def shard_of(loaded: torch.Tensor, dim: int, rank: int, size: int, what: str = "") -> torch.Tensor:
    """The rank-th of `size` equal slices of `loaded` along dim (a view, no copy)."""
    full = loaded.shape[dim]
    if full % size:
        raise CheckpointError(f"cannot split {what or 'tensor'} of size {full} along dim {dim} into {size} parts")
    step = full // size
    return loaded.narrow(dim, rank * step, step)


def sharded_loader(dim: int, tp: GroupInfo) -> Callable:
    """Loader for a parameter split evenly along `dim` across the TP ranks (the checkpoint holds the whole)."""

    def load(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        full_shape = list(param.shape)
        full_shape[dim] *= tp.size
        if list(loaded.shape) != full_shape:
            raise CheckpointError(
                f"shape mismatch: checkpoint tensor has shape {tuple(loaded.shape)}, the model expects "
                f"{tuple(full_shape)}"
            )
        param.data.copy_(shard_of(loaded, dim, tp.rank, tp.size))

    return load


def load_parts(param: torch.Tensor, loaded: torch.Tensor, shard_id, full_sizes: list[int], tp: GroupInfo) -> None:
    """Load a parameter made of parts stacked along dim 0, each split on its own across the TP ranks, so a
    rank holds [part0 slice, part1 slice, ...]. shard_id = index of the part, or None for a checkpoint
    tensor that already holds all parts."""
    local_sizes = [size // tp.size for size in full_sizes]
    if shard_id is None:
        check_shape((sum(full_sizes), *param.shape[1:]), loaded)
        items = enumerate(torch.split(loaded, full_sizes, dim=0))
    else:
        items = [(shard_id, loaded)]
    for index, part in items:
        check_shape((full_sizes[index], *param.shape[1:]), part)
        start = sum(local_sizes[:index])
        param.data.narrow(0, start, local_sizes[index]).copy_(shard_of(part, 0, tp.rank, tp.size))
