"""Which decoder layers each pipeline stage owns: the uniform rule, explicit partitions (validated),
`make_layers`, and the `PPMissingLayer` placeholder that stands for another stage's layer.

The one resolver of a partition spec (uniform, explicit, auto, auto-compute) is
`tandem.runtime.planning.resolve.resolve_partition`: the auto modes need per-layer costs from the model.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Sequence

import torch.nn as nn

from tandem.errors import PartitionError
from tandem.parallel.layout import ParallelLayout


class PPMissingLayer(nn.Module):
    """A layer that lives on another stage: no parameters, and calling it is a bug."""

    def __init__(self, index: int | str):
        super().__init__()
        self.index = index

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"layer {self.index} belongs to another pipeline stage and cannot run here")

    def extra_repr(self) -> str:
        return f"index={self.index}"


def uniform_partition(num_layers: int, pp_size: int) -> list[int]:
    """num_layers // pp_size layers per stage; the remainder goes one by one to the stages before the
    last, starting from the second-to-last (so middle stages first); the last stage, which carries the
    LM head, never gets an extra layer."""
    _check_sizes(num_layers, pp_size)
    counts = [num_layers // pp_size] * pp_size
    for i in range(num_layers % pp_size):
        counts[pp_size - 2 - i] += 1
    return counts


def parse_partition(spec: str | Sequence, num_layers: int, pp_size: int) -> list[int]:
    """Validate an explicit partition such as "15,15,14,16" or [15, 15, 14, 16]."""
    _check_sizes(num_layers, pp_size)
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",")]
        counts = []
        for part in parts:
            # NOTE: a strict pattern: int() would also accept "1_0" and non-ASCII digits
            if not re.fullmatch(r"[+-]?[0-9]+", part):
                raise PartitionError(
                    f"invalid pipeline layer partition {spec!r}: {part!r} is not an integer "
                    f"(expected {pp_size} comma-separated layer counts summing to {num_layers})"
                )
            counts.append(int(part))
    elif isinstance(spec, (list, tuple)):
        counts = list(spec)
        for item in counts:
            if isinstance(item, bool) or not isinstance(item, numbers.Integral):
                raise PartitionError(
                    f"invalid pipeline layer partition {counts!r}: {item!r} is not an integer layer count"
                )
        counts = [int(c) for c in counts]
    else:
        raise PartitionError(
            f"invalid pipeline layer partition {spec!r}: expected {pp_size} layer counts summing to "
            f"{num_layers}, as a comma-separated string or a list of integers"
        )
    if len(counts) != pp_size:
        raise PartitionError(
            f"invalid pipeline layer partition {counts}: it has {len(counts)} entries but pp_size is {pp_size}"
        )
    bad = [c for c in counts if c < 1]
    if bad:
        raise PartitionError(
            f"invalid pipeline layer partition {counts}: every stage needs at least one layer, got {bad[0]}"
        )
    if sum(counts) != num_layers:
        raise PartitionError(
            f"invalid pipeline layer partition {counts}: it sums to {sum(counts)} but the model has "
            f"{num_layers} layers"
        )
    return counts


def stage_bounds(counts: Sequence[int]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for count in counts:
        bounds.append((start, start + count))
        start += count
    return bounds


def make_layers(layout: ParallelLayout, num_layers: int,
                layer_fn: Callable[[int], nn.Module]) -> tuple[int, int, nn.ModuleList]:
    """Build only this stage's layers; other indices hold `PPMissingLayer` so names stay global."""
    start, end = layout.stage_range(num_layers)
    layers = [layer_fn(i) if start <= i < end else PPMissingLayer(i) for i in range(num_layers)]
    return start, end, nn.ModuleList(layers)


def _check_sizes(num_layers: int, pp_size: int) -> None:
    if pp_size < 1:
        raise PartitionError(f"pp_size must be at least 1, got {pp_size}")
    if pp_size > num_layers:
        raise PartitionError(
            f"pp_size {pp_size} exceeds the model's {num_layers} layers: every stage needs at least one layer"
        )
