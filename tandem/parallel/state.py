"""The process's place in the parallel layout: its TP group, its PP group and the layer partition.

`get_tp()` / `get_pp()` return frozen `GroupInfo`s. Before `init_parallel` runs they describe a single
process (rank 0 of size 1, no group), so models can be built and tested in one process unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class GroupInfo:
    rank: int
    size: int
    group: Any = None
    ranks: tuple[int, ...] = (0,)  # global ranks of the group, indexed by group rank

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1


_SINGLE = GroupInfo(0, 1)
_tp: GroupInfo = _SINGLE
_pp: GroupInfo = _SINGLE
_partition: tuple[int, ...] | None = None


def get_tp() -> GroupInfo:
    return _tp


def get_pp() -> GroupInfo:
    return _pp


def get_partition() -> tuple[int, ...] | None:
    """Layers per stage, or None when the uniform rule applies."""
    return _partition


def set_partition(layers_per_stage: list[int] | tuple[int, ...] | None) -> None:
    global _partition
    _partition = tuple(layers_per_stage) if layers_per_stage is not None else None


def set_single_process() -> None:
    global _tp, _pp
    _tp, _pp = _SINGLE, _SINGLE


def init_parallel(tp_size: int, pp_size: int, rank: int, backend: str, init_method: str, timeout_s: float = 600) -> None:
    """Join the world of tp_size*pp_size ranks and build the TP and PP groups (see DESIGN.md)."""
    import datetime

    global _tp, _pp
    world = tp_size * pp_size
    if world == 1:
        set_single_process()
        return
    dist.init_process_group(backend, init_method=init_method, world_size=world, rank=rank,
                            timeout=datetime.timedelta(seconds=timeout_s))
    pp_rank, tp_rank = divmod(rank, tp_size)
    # NOTE: new_group is collective: every rank must create every group, in the same order.
    for stage in range(pp_size):
        ranks = tuple(range(stage * tp_size, (stage + 1) * tp_size))
        group = dist.new_group(list(ranks)) if tp_size > 1 else None
        if stage == pp_rank:
            _tp = GroupInfo(tp_rank, tp_size, group, ranks)
    for column in range(tp_size):
        ranks = tuple(column + stage * tp_size for stage in range(pp_size))
        group = dist.new_group(list(ranks)) if pp_size > 1 else None
        if column == tp_rank:
            _pp = GroupInfo(pp_rank, pp_size, group, ranks)


def destroy_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    set_single_process()
