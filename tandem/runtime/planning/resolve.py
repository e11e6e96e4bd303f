"""The one resolver of a `--pp-layer-partition` spec (`resolve_partition`), and the partition an engine runs
(`engine_partition`):
- `uniform`, or an explicit list (validated);
- `auto`: the contiguous split minimising the largest stage's memory: weights, plus the caches when their
  sizes are given (`--max-total-tokens` tokens, `--max-running-requests` requests' state slots);
- `auto-compute`: minimising the largest stage's FLOPs per token;
- `auto-latency`: minimising the largest stage's decode time, measured at start-up on the engine's device
  (`decode_timing`: one layer of each kind, the embedding and the LM head + sampler timed);
- `auto-capacity`: maximising the engine's KV capacity, the minimum over stages of the tokens each stage's
  pool holds in the device's memory (`sizing`, with the estimated activation reserve). For hybrid models,
  where the full-attention layers fall decides it.
The searches themselves are in `search.py`."""

from __future__ import annotations

import logging
from collections.abc import Callable

from tandem.config import EngineConfig
from tandem.errors import PartitionError
from tandem.parallel.partition import parse_partition, uniform_partition
from tandem.runtime.memory.device_memory import driver_device_memory_bytes
from tandem.runtime.planning.decode_timing import DecodeTiming, measure_decode_timing
from tandem.runtime.planning.search import capacity_partition, min_max_partition, stage_extras
from tandem.runtime.planning.sizing import PoolSettings
from tandem.runtime.planning.stage_costs import ModelCosts, costs_for

logger = logging.getLogger("tandem")

AUTO_KINDS = ("auto", "auto-compute", "auto-latency", "auto-capacity")


def partition_from_costs(costs: ModelCosts, pp_size: int, kind: str, settings: PoolSettings | None = None,
                         timing: DecodeTiming | None = None) -> list[int]:
    if kind == "auto":
        tokens = settings.max_total_tokens or 0 if settings else 0
        slots = (settings.max_running_requests or 0) * settings.slots_per_request if settings else 0
        layer = [costs.weight_bytes[i] + tokens * costs.kv_bytes_per_token[i] + slots * costs.state_bytes_per_slot[i]
                 for i in range(costs.num_layers)]
        return min_max_partition(layer, pp_size, stage_extras(costs.extra_weight_bytes, pp_size))
    if kind == "auto-compute":
        return min_max_partition(costs.flops, pp_size, stage_extras(costs.extra_flops, pp_size))
    if kind == "auto-latency":
        if timing is None:
            raise PartitionError("auto-latency times the model on the engine's device at start-up; there is no "
                                 "timing here (tandem plan cannot measure it: use auto-compute or a list)")
        return min_max_partition(list(timing.layer_seconds), pp_size, stage_extras(timing.extra_seconds, pp_size))
    if kind == "auto-capacity":
        if settings is None or settings.memory_bytes is None:
            raise PartitionError("auto-capacity needs the device memory to size the stages' pools")
        return capacity_partition(costs, pp_size, settings)
    raise PartitionError(f"unknown automatic partition {kind!r}; expected one of {', '.join(AUTO_KINDS)}")


def resolve_partition(spec, pp_size: int, num_layers: int, costs: Callable[[], ModelCosts],
                      settings: Callable[[], PoolSettings] | None = None,
                      timing: Callable[[], DecodeTiming] | None = None) -> list[int]:
    """The layers per stage for a `--pp-layer-partition` spec: None/"uniform", an explicit list (validated),
    or one of `AUTO_KINDS`. `costs()`, `settings()` and `timing()` are called only for the automatic kinds
    (`timing` only for auto-latency)."""
    if spec is None or spec == "uniform":
        return uniform_partition(num_layers, pp_size)
    if isinstance(spec, str) and spec.startswith("auto"):
        if spec not in AUTO_KINDS:
            raise PartitionError(f"unknown automatic partition {spec!r}; expected one of {', '.join(AUTO_KINDS)}")
        uniform_partition(num_layers, pp_size)  # clear error when pp_size > layers
        if pp_size == 1:
            return [num_layers]
        measured = timing() if spec == "auto-latency" and timing is not None else None
        return partition_from_costs(costs(), pp_size, spec, settings() if settings else None, measured)
    return parse_partition(spec, num_layers, pp_size)


def engine_partition(config: EngineConfig) -> list[int]:
    """The partition an engine with `config` runs (auto-capacity: in the memory of this machine's devices)."""
    args = config.args

    def settings() -> PoolSettings:
        memory = driver_device_memory_bytes(args.device, args.world_size // args.nnodes)
        return PoolSettings.from_config(config, memory)

    def timing() -> DecodeTiming:
        measured = measure_decode_timing(args)
        logger.info("auto-latency: %s", measured.describe(config.model))
        return measured

    partition = resolve_partition(args.pp_layer_partition, args.pp_size, config.model.num_layers,
                                  lambda: costs_for(config), settings, timing)
    if isinstance(args.pp_layer_partition, str) and args.pp_layer_partition.startswith("auto"):
        logger.info("%s partition: %s", args.pp_layer_partition, partition)
    return partition
