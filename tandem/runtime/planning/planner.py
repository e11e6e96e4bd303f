"""Stage planner: what each pipeline stage holds (weights, KV pool, linear-attention state pool, activation
reserve, token capacity, compute per token) from the model config alone, and the automatic partitions.

`resolve_partition` is the one resolver of a `--pp-layer-partition` spec:
- `uniform`, or an explicit list (validated);
- `auto`: the contiguous split minimising the largest stage's memory: weights, plus the caches when their
  sizes are given (`--max-total-tokens` tokens, `--max-running-requests` requests' state slots);
- `auto-compute`: minimising the largest stage's FLOPs per token;
- `auto-latency`: minimising the largest stage's decode time, measured at start-up on the engine's device
  (`tandem.runtime.planning.decode_timing`: one layer of each kind, the embedding and the LM head + sampler timed);
- `auto-capacity`: maximising the engine's KV capacity, the minimum over stages of the tokens each stage's
  pool holds in the device's memory (`tandem.runtime.memory.sizing` sizing, with the estimated activation
  reserve). For hybrid models, where the full-attention layers fall decides it.

`min_max_partition` (auto, auto-compute, auto-latency) is exact by dynamic programming over (stage, end layer), ties broken
by the smallest sum of squared stage costs. `capacity_partition` (auto-capacity) is exact too: the stages
agree on the number of running requests (the minimum of each stage's), which sets the state pool and so the
tokens every stage holds; for each possible agreed value R it maximises the minimum capacity over splits
whose smallest stage value is exactly R (a dynamic program with one flag), and keeps the best R.

`plan_stages` reports each stage as the engine would size it: the same functions, the same agreement."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tandem.config import EngineArgs, ModelConfig
from tandem.errors import PartitionError
from tandem.parallel.partition import parse_partition, stage_bounds, uniform_partition
from tandem.runtime.memory.device_memory import driver_device_memory_bytes
from tandem.runtime.memory.sizing import (
    StageMemory,
    agreed_min,
    final_requests,
    size_requests,
    state_slots_per_request,
)
from tandem.runtime.planning.decode_timing import DecodeTiming, measure_decode_timing
from tandem.runtime.planning.stage_costs import (  # noqa: F401  (re-exported: the planner's public API)
    ModelCosts,
    build_model,
    build_stage_on_meta,
    costs_for,
    model_costs,
    model_weight_bytes,
    stage_weight_bytes_on_meta,
)

logger = logging.getLogger("tandem")

AUTO_KINDS = ("auto", "auto-compute", "auto-latency", "auto-capacity")


@dataclass(frozen=True)
class PoolSettings:
    """The engine settings that size the pools, and the device memory to size them in."""

    page_size: int
    max_total_tokens: int | None
    max_running_requests: int | None
    slots_per_request: int
    mem_fraction: float
    memory_bytes: int | None = None  # per device; needed for memory-derived sizes and auto-capacity
    activation_reserve_bytes: int | None = None  # a measured reserve, for every stage, instead of the estimate

    @classmethod
    def from_args(cls, config: ModelConfig, args: EngineArgs, memory_bytes: int | None = None,
                  activation_reserve_bytes: int | None = None) -> "PoolSettings":
        return cls(args.page_size, args.max_total_tokens, args.max_running_requests,
                   state_slots_per_request(config, not args.disable_radix_cache), args.resolved_mem_fraction(),
                   memory_bytes, activation_reserve_bytes)


@dataclass(frozen=True)
class StageSums:
    """One stage's per-device figures before sizing."""

    weight_bytes: int
    kv_bytes_per_token: int
    state_bytes_per_slot: int
    activation_reserve_bytes: int
    flops_per_token: float


def stage_sums(costs: ModelCosts, start: int, end: int, position: str, settings: PoolSettings | None) -> StageSums:
    layers = range(start, end)
    reserve = (settings.activation_reserve_bytes if settings and settings.activation_reserve_bytes is not None
               else max(costs.activation_bytes[i] for i in layers) + costs.extra_activation_bytes[position])
    return StageSums(sum(costs.weight_bytes[i] for i in layers) + costs.extra_weight_bytes[position],
                     sum(costs.kv_bytes_per_token[i] for i in layers),
                     sum(costs.state_bytes_per_slot[i] for i in layers), reserve,
                     sum(costs.flops[i] for i in layers) + costs.extra_flops[position])


def stage_memory(sums: StageSums, settings: PoolSettings) -> StageMemory | None:
    """The memory a stage sizes its pools from (None when --max-total-tokens fixes them)."""
    if settings.max_total_tokens is not None or settings.memory_bytes is None:
        return None
    return StageMemory(settings.memory_bytes, settings.mem_fraction, sums.weight_bytes, sums.activation_reserve_bytes)


def stage_capacity(sums: StageSums, settings: PoolSettings, requests: int) -> int | None:
    """Tokens a stage's KV pool holds with state slots for `requests` requests: the given max_total_tokens, or
    what its memory holds in whole pages (<= 0 when not even one page fits). None: no full-attention layer."""
    ps = settings.page_size
    if settings.max_total_tokens is not None:
        return settings.max_total_tokens // ps * ps
    if sums.kv_bytes_per_token == 0:
        return None
    memory = stage_memory(sums, settings)
    if memory is None:
        raise PartitionError("sizing the KV pool from memory needs the device memory")
    state = requests * settings.slots_per_request * sums.state_bytes_per_slot
    return (memory.budget - state) // (sums.kv_bytes_per_token * ps) * ps


def stage_requests(sums: StageSums, settings: PoolSettings) -> int:
    return size_requests(settings.max_running_requests, stage_memory(sums, settings), sums.state_bytes_per_slot,
                         settings.slots_per_request)


# ---- partitions -----------------------------------------------------------------------------------------------


def min_max_partition(layer_costs: Sequence[float], pp_size: int,
                      stage_extra: Sequence[float] | None = None) -> list[int]:
    """Contiguous split of the layers into pp_size stages of >= 1 layer each that minimises the largest
    stage cost, where stage k costs sum(layer_costs in it) + stage_extra[k]. Exact (dynamic programming,
    O(pp_size * L^2)); among optimal splits it returns the one with the smallest sum of squared stage costs,
    then the lexicographically smallest."""
    L = len(layer_costs)
    uniform_partition(L, pp_size)  # validates pp_size against L
    extra = list(stage_extra) if stage_extra is not None else [0] * pp_size
    if len(extra) != pp_size:
        raise ValueError(f"stage_extra has {len(extra)} entries for {pp_size} stages")
    prefix = [0]
    for c in layer_costs:
        prefix.append(prefix[-1] + c)

    def cost(k: int, i: int, j: int):
        return prefix[j] - prefix[i] + extra[k]

    inf = float("inf")
    # best[k][j]: smallest possible max cost of stages 0..k covering layers [0, j)
    best = [[inf] * (L + 1) for _ in range(pp_size)]
    for j in range(1, L - pp_size + 2):
        best[0][j] = cost(0, 0, j)
    for k in range(1, pp_size):
        for j in range(k + 1, L - (pp_size - 1 - k) + 1):
            best[k][j] = min(max(best[k - 1][i], cost(k, i, j)) for i in range(k, j))
    limit = best[pp_size - 1][L]
    if isinstance(limit, float):
        limit = limit * (1 + 1e-12) + 1e-9  # float costs: tolerate rounding in the sums
    # second pass: among splits whose stages all cost <= limit, the smallest sum of squares
    sq: list[list] = [[None] * (L + 1) for _ in range(pp_size)]
    choice = [[0] * (L + 1) for _ in range(pp_size)]
    for j in range(1, L - pp_size + 2):
        c = cost(0, 0, j)
        if c <= limit:
            sq[0][j] = c * c
    for k in range(1, pp_size):
        for j in range(k + 1, L - (pp_size - 1 - k) + 1):
            for i in range(k, j):
                c = cost(k, i, j)
                if sq[k - 1][i] is None or c > limit:
                    continue
                value = sq[k - 1][i] + c * c
                if sq[k][j] is None or value < sq[k][j]:
                    sq[k][j], choice[k][j] = value, i
    return _counts_from_choices(choice, pp_size, L)


def _counts_from_choices(choice: list[list[int]], pp_size: int, num_layers: int) -> list[int]:
    counts, j = [], num_layers
    for k in range(pp_size - 1, 0, -1):
        i = choice[k][j]
        counts.append(j - i)
        j = i
    counts.append(j)
    return counts[::-1]


def stage_extras(values: dict, pp_size: int) -> list:
    return [values[ModelCosts.position(k, pp_size)] for k in range(pp_size)]


def capacity_partition(costs: ModelCosts, pp_size: int, settings: PoolSettings) -> list[int]:
    """The split maximising the engine's KV capacity (see the module docstring). Exact; among splits of equal
    capacity it prefers a larger agreed request count, then the one found first."""
    L = costs.num_layers
    uniform_partition(L, pp_size)
    positions = {k: ModelCosts.position(k, pp_size) for k in range(pp_size)}
    sums = {(p, i, j): stage_sums(costs, i, j, p, settings)
            for p in set(positions.values()) for i in range(L) for j in range(i + 1, L + 1)}
    requests = {key: stage_requests(s, settings) for key, s in sums.items()}
    given = settings.max_running_requests is not None
    candidates = [settings.max_running_requests] if given else sorted({r for r in requests.values() if r >= 1})
    best_value, best_counts = None, None
    for agreed in candidates:  # ascending: a larger agreed count only lowers every stage's capacity
        value, counts, bound = _capacity_dp(sums, requests, positions, L, pp_size, settings, agreed, exact=not given)
        if best_value is not None and bound < best_value:
            break  # no split agreeing on `agreed` or more requests can do better
        if counts is not None and (best_value is None or value >= best_value):
            best_value, best_counts = value, counts
    if best_counts is None:  # nothing fits (the plan says so): the split that misses by the least
        relaxed = {key: max(r, 1) for key, r in requests.items()}
        _, best_counts, _ = _capacity_dp(sums, relaxed, positions, L, pp_size, settings, 1, exact=False)
    return best_counts


def _capacity_dp(sums, requests, positions, L: int, pp_size: int, settings: PoolSettings, agreed: int,
                 exact: bool) -> tuple[float, list[int] | None, float]:
    """Max over splits of the minimum stage capacity with state for `agreed` requests, over splits whose stages
    all allow `agreed` requests and (exact) one of them allows exactly that many: (value, split, bound). The
    bound drops the `exactly` condition: no split agreeing on `agreed` or more requests holds more than it
    (those splits are among these, and more requests leave each stage less room)."""
    inf = float("inf")
    value = {key: (_none_is_inf(stage_capacity(s, settings, agreed)), requests[key] == agreed or not exact)
             for key, s in sums.items() if requests[key] >= agreed}
    # best[k][j][flag]: the best minimum capacity of stages 0..k covering [0, j); flag: a stage allows exactly
    # `agreed` requests (always true when not exact)
    best = [[[None, None] for _ in range(L + 1)] for _ in range(pp_size)]
    choice = [[[None, None] for _ in range(L + 1)] for _ in range(pp_size)]
    for j in range(1, L - pp_size + 2):
        v = value.get((positions[0], 0, j))
        if v is not None:
            best[0][j][int(v[1])] = v[0]
    for k in range(1, pp_size):
        for j in range(k + 1, L - (pp_size - 1 - k) + 1):
            for i in range(k, j):
                v = value.get((positions[k], i, j))
                if v is None:
                    continue
                for flag in (0, 1):
                    prev = best[k - 1][i][flag]
                    if prev is None:
                        continue
                    new_flag, candidate = flag | int(v[1]), min(prev, v[0])
                    if best[k][j][new_flag] is None or candidate > best[k][j][new_flag]:
                        best[k][j][new_flag], choice[k][j][new_flag] = candidate, (i, flag)
    ends = [v for v in best[pp_size - 1][L] if v is not None]
    bound = max(ends) if ends else -inf
    final = best[pp_size - 1][L][1]
    if final is None:
        return -inf, None, bound
    counts, j, flag = [], L, 1
    for k in range(pp_size - 1, 0, -1):
        i, flag = choice[k][j][flag]
        counts.append(j - i)
        j = i
    counts.append(j)
    return final, counts[::-1], bound


def _none_is_inf(tokens: int | None) -> float:
    return float("inf") if tokens is None else tokens


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


def engine_partition(model_config: ModelConfig, args: EngineArgs) -> list[int]:
    """The partition an engine with `args` runs (auto-capacity: in the memory of this machine's devices)."""
    def settings() -> PoolSettings:
        memory = driver_device_memory_bytes(args.device, args.world_size // args.nnodes)
        return PoolSettings.from_args(model_config, args, memory)

    def timing() -> DecodeTiming:
        measured = measure_decode_timing(args)
        logger.info("auto-latency: %s", measured.describe(model_config))
        return measured

    partition = resolve_partition(args.pp_layer_partition, args.pp_size, model_config.num_layers,
                                  lambda: costs_for(model_config, args), settings, timing)
    if isinstance(args.pp_layer_partition, str) and args.pp_layer_partition.startswith("auto"):
        logger.info("%s partition: %s", args.pp_layer_partition, partition)
    return partition


# ---- plans ----------------------------------------------------------------------------------------------------


@dataclass
class StagePlan:
    pp_rank: int
    layer_start: int
    layer_end: int
    layer_kinds: dict[str, int]
    moe_layers: int
    has_embedding: bool
    has_lm_head: bool
    weight_bytes: int
    kv_bytes_per_token: int
    state_bytes_per_slot: int
    activation_reserve_bytes: int
    stage_max_total_tokens: int | None  # what this stage alone holds (None: no full-attention layer)
    max_total_tokens: int  # agreed by every stage (the engine's capacity)
    max_running_requests: int
    state_slots: int
    flops_per_token: float

    @property
    def kv_cache_bytes(self) -> int:
        return self.max_total_tokens * self.kv_bytes_per_token

    @property
    def state_cache_bytes(self) -> int:
        return self.state_slots * self.state_bytes_per_slot

    @property
    def cache_bytes(self) -> int:
        return self.kv_cache_bytes + self.state_cache_bytes

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.cache_bytes

    @property
    def kinds(self) -> str:
        """E.g. "15 linear_attention + 5 full_attention, MoE"."""
        n = self.layer_end - self.layer_start
        text = " + ".join(f"{count} {kind}" for kind, count in self.layer_kinds.items())
        if self.moe_layers == n:
            return text + ", MoE"
        if self.moe_layers == 0:
            return text + ", dense MLP"
        return text + f", {self.moe_layers} MoE + {n - self.moe_layers} dense MLP"

    def fits(self, device_memory: int) -> bool:
        """Weights, caches and the activation reserve fit the device, with at least one page of KV."""
        holds = self.stage_max_total_tokens is None or self.stage_max_total_tokens > 0
        return holds and self.max_total_tokens > 0 and self.max_running_requests > 0 and \
            self.total_bytes + self.activation_reserve_bytes <= device_memory

    def to_dict(self, device_memory: int | None = None) -> dict:
        out = {
            "pp_rank": self.pp_rank, "layer_start": self.layer_start, "layer_end": self.layer_end,
            "num_layers": self.layer_end - self.layer_start, "layer_kinds": dict(self.layer_kinds),
            "moe_layers": self.moe_layers, "kinds": self.kinds, "has_embedding": self.has_embedding,
            "has_lm_head": self.has_lm_head, "weight_bytes": self.weight_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token, "state_bytes_per_slot": self.state_bytes_per_slot,
            "stage_max_total_tokens": self.stage_max_total_tokens, "max_total_tokens": self.max_total_tokens,
            "max_running_requests": self.max_running_requests, "state_slots": self.state_slots,
            "kv_cache_bytes": self.kv_cache_bytes, "state_cache_bytes": self.state_cache_bytes,
            "cache_bytes": self.cache_bytes, "total_bytes": self.total_bytes,
            "activation_reserve_bytes": self.activation_reserve_bytes, "flops_per_token": self.flops_per_token,
        }
        if device_memory is not None:
            out["fits"] = self.fits(device_memory)
        return out


def plan_stages(costs: ModelCosts, partition: Sequence[int], settings: PoolSettings) -> list[StagePlan]:
    """What each stage of a (validated) partition holds, sized as the engine sizes it."""
    pp_size = len(partition)
    order = list(dict.fromkeys(costs.layer_types))  # kinds listed in the model's order on every stage
    bounds = stage_bounds(partition)
    sums = [stage_sums(costs, start, end, ModelCosts.position(rank, pp_size), settings)
            for rank, (start, end) in enumerate(bounds)]
    requests = max(0, min(stage_requests(s, settings) for s in sums))
    capacities = [stage_capacity(s, settings, requests) for s in sums]
    agreed = max(0, agreed_min(capacities) or 0) if requests else 0  # no request's state fits: nothing does
    running = final_requests(settings.max_running_requests, requests, agreed, settings.page_size) if agreed else 0
    stages = []
    for rank, ((start, end), s, own) in enumerate(zip(bounds, sums, capacities)):
        layers = range(start, end)
        kinds = {kind: n for kind in order if (n := sum(costs.layer_types[i] == kind for i in layers))}
        stages.append(StagePlan(
            pp_rank=rank, layer_start=start, layer_end=end, layer_kinds=kinds,
            moe_layers=sum(costs.layer_moe[i] for i in layers),
            has_embedding=rank == 0, has_lm_head=rank == pp_size - 1,
            weight_bytes=s.weight_bytes, kv_bytes_per_token=s.kv_bytes_per_token,
            state_bytes_per_slot=s.state_bytes_per_slot, activation_reserve_bytes=s.activation_reserve_bytes,
            stage_max_total_tokens=None if own is None else max(own, 0), max_total_tokens=agreed,
            max_running_requests=running, state_slots=running * settings.slots_per_request,
            flops_per_token=s.flops_per_token,
        ))
    return stages
