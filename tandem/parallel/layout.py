"""The parallel layout as a value: which TP group and PP group a rank belongs to and how the decoder layers
are split across stages. Nothing here is process-global: a `ParallelLayout` is built once per rank (by
`init_process_groups`, or `ParallelLayout.single` / `ParallelLayout.describe` without process groups) and
passed into model construction, so two engines in one process never interfere."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from tandem.errors import PartitionError


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

    @classmethod
    def alone(cls) -> "GroupInfo":
        return cls(0, 1)


@dataclass(frozen=True)
class ParallelLayout:
    """One rank's place: its TP group, its PP group and the layers per stage (`partition`)."""

    tp: GroupInfo
    pp: GroupInfo
    partition: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.partition) != self.pp.size:
            raise PartitionError(f"partition {list(self.partition)} has {len(self.partition)} stages but "
                                 f"pp_size is {self.pp.size}")

    @classmethod
    def single(cls, num_layers: int) -> "ParallelLayout":
        """The whole model in one process."""
        return cls(GroupInfo.alone(), GroupInfo.alone(), (num_layers,))

    @classmethod
    def describe(cls, partition: Sequence[int], tp_size: int = 1, tp_rank: int = 0, pp_rank: int = 0) -> "ParallelLayout":
        """A rank of a (tp_size, len(partition)) layout without process groups: what that rank would
        build, for planning on the meta device."""
        pp_size = len(partition)
        return cls(GroupInfo(tp_rank, tp_size, None, tuple(range(tp_size))),
                   GroupInfo(pp_rank, pp_size, None, tuple(range(pp_size))), tuple(partition))

    def stage_range(self, num_layers: int) -> tuple[int, int]:
        """[start, end) of the layers this rank's stage owns."""
        if sum(self.partition) != num_layers:
            raise PartitionError(f"partition {list(self.partition)} does not fit {num_layers} layers")
        start = sum(self.partition[: self.pp.rank])
        return start, start + self.partition[self.pp.rank]

    @property
    def label(self) -> str:
        return f"[pp {self.pp.rank}/{self.pp.size} tp {self.tp.rank}/{self.tp.size}]"


def init_process_groups(tp_size: int, partition: Sequence[int], rank: int, backend: str, init_method: str,
                        timeout_s: float = 600) -> ParallelLayout:
    """Join the world of tp_size * pp_size ranks and build the TP and PP groups (see DESIGN.md)."""
    pp_size = len(partition)
    world = tp_size * pp_size
    if world == 1:
        return ParallelLayout(GroupInfo.alone(), GroupInfo.alone(), tuple(partition))
    dist.init_process_group(backend, init_method=init_method, world_size=world, rank=rank,
                            timeout=datetime.timedelta(seconds=timeout_s))
    _check_same_partition(partition, "cuda" if backend == "nccl" else "cpu")
    pp_rank, tp_rank = divmod(rank, tp_size)
    tp = pp = None
    # NOTE: new_group is collective: every rank must create every group, in the same order.
    for stage in range(pp_size):
        ranks = tuple(range(stage * tp_size, (stage + 1) * tp_size))
        group = dist.new_group(list(ranks)) if tp_size > 1 else None
        if stage == pp_rank:
            tp = GroupInfo(tp_rank, tp_size, group, ranks)
    for column in range(tp_size):
        ranks = tuple(column + stage * tp_size for stage in range(pp_size))
        group = dist.new_group(list(ranks)) if pp_size > 1 else None
        if column == tp_rank:
            pp = GroupInfo(pp_rank, pp_size, group, ranks)
    return ParallelLayout(tp, pp, tuple(partition))


def _check_same_partition(partition: Sequence[int], device: str) -> None:
    """Every rank must build its stage from the same split. Each node resolves `--pp-layer-partition` itself,
    and the automatic kinds depend on the machine (auto-capacity on its memory, auto-latency on its timing),
    so nodes can disagree: fail at start-up, naming both, instead of running mismatched stages."""
    counts = torch.tensor(list(partition), dtype=torch.int64, device=device)
    low, high = counts.clone(), counts.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise PartitionError(f"the ranks disagree on the layer partition: this rank has {list(partition)}, the "
                             f"world ranges from {low.tolist()} to {high.tolist()}; give every node the same "
                             f"explicit --pp-layer-partition (the driver logs the one it chose)")
