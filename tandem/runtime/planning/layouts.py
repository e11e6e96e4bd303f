"""The smallest pp x tp layouts whose every stage fits its device (`tandem plan` suggests them when the
layout asked for does not fit): for 1, 2, 3, ... devices, every pp x tp of that many (pp at most the number
of layers, tp a size the model's heads and widths shard into), each planned with the `uniform` and `auto`
partitions as the engine would size it; the first device count with a fitting layout gives the answer."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from tandem.config import EngineConfig
from tandem.errors import ConfigError
from tandem.runtime.planning.resolve import resolve_partition
from tandem.runtime.planning.sizing import PoolSettings, StagePlan, plan_stages
from tandem.runtime.planning.stage_costs import ModelCosts, costs_for

MAX_DEVICES = 64  # layouts beyond this many devices are not searched
SPECS = ("uniform", "auto")


@dataclass(frozen=True)
class Layout:
    pp_size: int
    tp_size: int
    partition_name: str
    partition: tuple[int, ...]
    max_total_tokens: int  # the engine's KV capacity with that partition

    def describe(self) -> str:
        return (f"pp={self.pp_size} tp={self.tp_size} ({self.partition_name} {list(self.partition)}: "
                f"{self.max_total_tokens:,} KV tokens)")


def fitting_plan(costs: ModelCosts, pp_size: int, settings: PoolSettings, memory_bytes: int,
                 specs=SPECS) -> tuple[str, list[int], list[StagePlan]] | None:
    """The first of `specs` whose plan fits every stage in `memory_bytes`: (spec, partition, stages)."""
    for spec in specs:
        counts = resolve_partition(spec, pp_size, costs.num_layers, lambda: costs, lambda: settings)
        stages = plan_stages(costs, counts, settings)
        if all(s.fits(memory_bytes) for s in stages):
            return spec, counts, stages
    return None


def smallest_fitting_layouts(config: EngineConfig, settings: PoolSettings, memory_bytes: int,
                             max_devices: int = MAX_DEVICES) -> list[Layout]:
    """Every pp x tp layout of the fewest devices (at most `max_devices`) that fits, pp ascending; [] if none."""
    costs_of = _costs_by_tp(config)
    for devices in range(1, max_devices + 1):
        found = []
        for pp in range(1, min(devices, config.model.num_layers) + 1):
            if devices % pp:
                continue
            costs = costs_of(devices // pp)
            plan = fitting_plan(costs, pp, settings, memory_bytes) if costs is not None else None
            if plan is not None:
                spec, counts, stages = plan
                found.append(Layout(pp, devices // pp, spec, tuple(counts), stages[0].max_total_tokens))
        if found:
            return found
    return []


def _costs_by_tp(config: EngineConfig) -> Callable[[int], ModelCosts | None]:
    """Per-layer costs at a TP size (built once per size), None for a size the model cannot shard into."""
    cache: dict[int, ModelCosts | None] = {}

    def costs_of(tp: int) -> ModelCosts | None:
        if tp not in cache:
            args = dataclasses.replace(config.args, tp_size=tp, pp_size=1, nnodes=1, node_rank=0)
            try:
                cache[tp] = costs_for(EngineConfig.resolve(args, config.model))
            except ConfigError:
                cache[tp] = None
        return cache[tp]

    return costs_of
