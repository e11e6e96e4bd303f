"""A planned stage's sizes, from per-layer costs (`stage_costs.ModelCosts`) and the pool settings, computed as
the engine sizes a real stage: the same functions of `tandem.runtime.memory.sizing`, the same agreement
across stages (the minimum). `plan_stages` gives every stage of a partition as a `StagePlan` (what `tandem
plan` prints); `stage_sums` / `stage_requests` / `stage_capacity` are the pieces the partition search
(`search.py`) optimises over."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tandem.config import EngineConfig
from tandem.errors import PartitionError
from tandem.parallel.partition import stage_bounds
from tandem.runtime.memory.sizing import (
    StageMemory,
    agreed_min,
    final_requests,
    request_token_cap,
    size_requests,
    state_slots_per_request,
)
from tandem.runtime.planning.stage_costs import ModelCosts


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
    context_length: int | None = None  # caps a memory-derived pool at requests x context (None: no cap)

    @classmethod
    def from_config(cls, config: EngineConfig, memory_bytes: int | None = None,
                    activation_reserve_bytes: int | None = None) -> PoolSettings:
        args = config.args
        return cls(args.page_size, args.max_total_tokens, args.max_running_requests,
                   state_slots_per_request(config.model, not args.disable_radix_cache), config.mem_fraction,
                   memory_bytes, activation_reserve_bytes, config.context_length)


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
                     sum(costs.kv_bytes_per_token[i] for i in layers) + costs.extra_kv_bytes_per_token.get(position, 0),
                     sum(costs.state_bytes_per_slot[i] for i in layers), reserve,
                     sum(costs.flops[i] for i in layers) + costs.extra_flops[position])


def stage_memory(sums: StageSums, settings: PoolSettings) -> StageMemory | None:
    """The memory a stage sizes its pools from (None when --max-total-tokens fixes them)."""
    if settings.max_total_tokens is not None or settings.memory_bytes is None:
        return None
    return StageMemory(settings.memory_bytes, settings.mem_fraction, sums.weight_bytes, sums.activation_reserve_bytes)


def stage_capacity(sums: StageSums, settings: PoolSettings, requests: int) -> int | None:
    """Tokens a stage's KV pool holds with state slots for `requests` requests: the given max_total_tokens, or
    what its memory holds in whole pages (<= 0 when not even one page fits), at most what the requests can hold
    (`request_token_cap`, as the engine caps it). None: no full-attention layer."""
    ps = settings.page_size
    if settings.max_total_tokens is not None:
        return settings.max_total_tokens // ps * ps
    if sums.kv_bytes_per_token == 0:
        return None
    memory = stage_memory(sums, settings)
    if memory is None:
        raise PartitionError("sizing the KV pool from memory needs the device memory")
    state = requests * settings.slots_per_request * sums.state_bytes_per_slot
    tokens = (memory.budget - state) // (sums.kv_bytes_per_token * ps) * ps
    return min(tokens, token_cap(settings, requests))


def token_cap(settings: PoolSettings, requests: int) -> float:
    """The KV tokens `requests` requests can hold (inf without a context length: no cap)."""
    if settings.context_length is None:
        return float("inf")
    return request_token_cap(requests, settings.context_length, settings.page_size)


def stage_requests(sums: StageSums, settings: PoolSettings) -> int:
    return size_requests(settings.max_running_requests, stage_memory(sums, settings), sums.state_bytes_per_slot,
                         settings.slots_per_request)


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
    def static_bytes(self) -> int:
        """Weights and caches (what the `auto` partition balances)."""
        return self.weight_bytes + self.cache_bytes

    @property
    def total_bytes(self) -> int:
        """What the stage needs on its device: weights, caches and the activation reserve."""
        return self.static_bytes + self.activation_reserve_bytes

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
            self.total_bytes <= device_memory

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
