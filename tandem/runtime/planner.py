"""Stage planner: what each pipeline stage holds (weights, KV cache, Gated-DeltaNet state cache, compute per
token) computed from the model config alone, and the `auto` / `auto-compute` layer partitions.

Byte counts are exact by construction: the planner builds the real Tandem model classes on the `meta` device
(no memory, no weights read) for a `ParallelLayout` describing TP rank 0 of the wanted layout, so a stage's
weight bytes are the sum of the same parameters `ModelRunner.weight_bytes` sums, and cache bytes come from
the same `CacheGeometry` the runner allocates with.

`resolve_partition` is the one resolver of a `--pp-layer-partition` spec (uniform, explicit, auto,
auto-compute).

A stage's cost is additive: the sum of its layers' costs plus a constant that depends only on the stage's
position (the embedding on the first stage, the final norm and LM head on the last, both when there is one
stage). `min_max_partition` finds the contiguous split minimising the largest stage cost exactly (dynamic
programming), breaking ties by the smallest sum of squared stage costs (the most even split).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tandem.config import EngineArgs, ModelConfig
from tandem.errors import PartitionError
from tandem.models.registry import get_model_class
from tandem.parallel.layout import ParallelLayout
from tandem.parallel.partition import parse_partition, stage_bounds, uniform_partition
from tandem.runtime.geometry import CacheGeometry

AUTO_KINDS = ("auto", "auto-compute")


def build_model(model_config: ModelConfig, layout: ParallelLayout, dtype: torch.dtype, device):
    """The model of one rank of `layout`, with parameters allocated (uninitialised) on `device`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return get_model_class(model_config.architecture)(model_config, layout)
    finally:
        torch.set_default_dtype(previous)


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def build_stage_on_meta(model_config: ModelConfig, dtype: torch.dtype, tp_size: int, pp_size: int = 1,
                        pp_rank: int = 0, partition: Sequence[int] | None = None, tp_rank: int = 0):
    """The model one rank would build, with every tensor on the meta device (nothing allocated)."""
    partition = tuple(partition) if partition is not None else tuple(uniform_partition(model_config.num_layers,
                                                                                       pp_size))
    layout = ParallelLayout.describe(partition, tp_size, tp_rank, pp_rank)
    return build_model(model_config, layout, dtype, torch.device("meta"))


def stage_weight_bytes_on_meta(model_config: ModelConfig, dtype: torch.dtype, tp_size: int,
                               partition: Sequence[int]) -> list[int]:
    """Weight bytes per stage from building each stage's whole model on meta (a cross-check of the
    additive model in `model_costs`; slower, as it builds every layer once per stage)."""
    return [_param_bytes(build_stage_on_meta(model_config, dtype, tp_size, len(partition), rank, partition))
            for rank in range(len(partition))]


@dataclass
class ModelCosts:
    """Per-layer costs on one device (TP rank 0) and the per-position constants of a stage."""

    layer_types: tuple[str, ...]
    layer_moe: tuple[bool, ...]
    weight_bytes: list[int]  # per layer
    kv_cache_bytes: list[int]  # per layer (0 for linear-attention layers)
    state_cache_bytes: list[int]  # per layer (0 for full-attention layers)
    flops: list[float]  # per layer, per token
    # extras by position: "single" (pp=1: first and last), "first", "middle", "last"
    extra_weight_bytes: dict[str, int] = field(default_factory=dict)
    extra_flops: dict[str, float] = field(default_factory=dict)
    slots: int = 0
    max_len: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.weight_bytes)

    def memory(self, i: int) -> int:
        return self.weight_bytes[i] + self.kv_cache_bytes[i] + self.state_cache_bytes[i]

    @staticmethod
    def position(pp_rank: int, pp_size: int) -> str:
        if pp_size == 1:
            return "single"
        return "first" if pp_rank == 0 else "last" if pp_rank == pp_size - 1 else "middle"


def _layer_flops(layer, weight_params: float, context: int) -> float:
    """2 FLOPs per active parameter, plus the attention / recurrence terms that do not live in weights."""
    flops = 2.0 * weight_params
    if hasattr(layer, "self_attn"):
        attn = layer.self_attn
        flops += 4.0 * attn.num_heads * attn.head_dim * context  # q.k over the context, then p.v
    elif hasattr(layer, "linear_attn"):
        gdn = layer.linear_attn
        # decay, k^T S, rank-1 update, q^T S: about 7 FLOPs per element of the [Hv, Dk, Dv] state
        flops += 7.0 * gdn.num_v_heads * gdn.head_k_dim * gdn.head_v_dim
    return flops


def _active_params(layer, config: ModelConfig) -> float:
    total = 0.0
    for name, p in layer.named_parameters():
        if ".experts." in f".{name}" and config.num_experts:
            total += p.numel() * config.num_experts_per_tok / config.num_experts  # only top-k experts run
        else:
            total += p.numel()
    return total


def model_costs(model_config: ModelConfig, tp_size: int, geometry: CacheGeometry,
                context: int | None = None) -> ModelCosts:
    """Per-layer bytes and FLOPs for one TP rank, from models built on meta. `context` is the number of
    context tokens assumed for the attention term of the compute estimate (default max_len // 2)."""
    dtype, slots, max_len = geometry.dtype, geometry.num_slots, geometry.max_len
    context = max_len // 2 if context is None else context
    L = model_config.num_layers
    full = build_stage_on_meta(model_config, dtype, tp_size)
    layers = full.model.layers
    weights, kv, gdn_state, flops = [], [], [], []
    for i in range(L):
        layer = layers[i]
        weights.append(_param_bytes(layer))
        flops.append(_layer_flops(layer, _active_params(layer, model_config), context))
        cache = geometry.layer_bytes(layer, model_config)
        is_linear = model_config.layer_types[i] == "linear_attention"
        kv.append(0 if is_linear else cache)
        gdn_state.append(cache if is_linear else 0)
    head_rows = full.lm_head.weight.shape[0]
    head_flops = 2.0 * head_rows * model_config.hidden_size  # logits for the sampled token
    extra_bytes = {"single": _param_bytes(full) - sum(weights)}
    if L >= 2:
        first = build_stage_on_meta(model_config, dtype, tp_size, 2, 0, (1, L - 1))
        last = build_stage_on_meta(model_config, dtype, tp_size, 2, 1, (L - 1, 1))
        extra_bytes["first"] = _param_bytes(first) - weights[0]
        extra_bytes["last"] = _param_bytes(last) - weights[L - 1]
    if L >= 3:
        middle = build_stage_on_meta(model_config, dtype, tp_size, 3, 1, (1, 1, L - 2))
        extra_bytes["middle"] = _param_bytes(middle) - weights[1]
    extra_flops = {"single": head_flops, "first": 0.0, "middle": 0.0, "last": head_flops}
    moe = tuple(model_config.is_moe_layer(i) for i in range(L))
    return ModelCosts(tuple(model_config.layer_types), moe, weights, kv, gdn_state, flops, extra_bytes,
                      extra_flops, slots, max_len)


def costs_for(model_config: ModelConfig, args: EngineArgs) -> ModelCosts:
    return model_costs(model_config, args.tp_size, CacheGeometry.from_args(model_config, args))


# ---- the partition algorithm ------------------------------------------------------------------------------


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
    counts, j = [], L
    for k in range(pp_size - 1, 0, -1):
        i = choice[k][j]
        counts.append(j - i)
        j = i
    counts.append(j)
    return counts[::-1]


def stage_extras(values: dict, pp_size: int) -> list:
    return [values[ModelCosts.position(k, pp_size)] for k in range(pp_size)]


def partition_from_costs(costs: ModelCosts, pp_size: int, kind: str) -> list[int]:
    if kind == "auto":
        layer = [costs.memory(i) for i in range(costs.num_layers)]
        return min_max_partition(layer, pp_size, stage_extras(costs.extra_weight_bytes, pp_size))
    if kind == "auto-compute":
        return min_max_partition(costs.flops, pp_size, stage_extras(costs.extra_flops, pp_size))
    raise PartitionError(f"unknown automatic partition {kind!r}; expected one of {', '.join(AUTO_KINDS)}")


def resolve_partition(spec, pp_size: int, num_layers: int, costs: Callable[[], ModelCosts]) -> list[int]:
    """The layers per stage for a `--pp-layer-partition` spec: None/"uniform", an explicit list (validated),
    "auto" (balance memory: weights + caches per device) or "auto-compute" (balance FLOPs per token).
    `costs()` is called only for the automatic kinds."""
    if spec is None or spec == "uniform":
        return uniform_partition(num_layers, pp_size)
    if isinstance(spec, str) and spec.startswith("auto"):
        if spec not in AUTO_KINDS:
            raise PartitionError(f"unknown automatic partition {spec!r}; expected one of {', '.join(AUTO_KINDS)}")
        uniform_partition(num_layers, pp_size)  # clear error when pp_size > layers
        return [num_layers] if pp_size == 1 else partition_from_costs(costs(), pp_size, spec)
    return parse_partition(spec, num_layers, pp_size)


def engine_partition(model_config: ModelConfig, args: EngineArgs) -> list[int]:
    """The partition an engine with `args` runs."""
    return resolve_partition(args.pp_layer_partition, args.pp_size, model_config.num_layers,
                             lambda: costs_for(model_config, args))


# ---- plans ------------------------------------------------------------------------------------------------


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
    kv_cache_bytes: int
    state_cache_bytes: int
    flops_per_token: float

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

    def to_dict(self, device_memory: int | None = None) -> dict:
        out = {
            "pp_rank": self.pp_rank, "layer_start": self.layer_start, "layer_end": self.layer_end,
            "num_layers": self.layer_end - self.layer_start, "layer_kinds": dict(self.layer_kinds),
            "moe_layers": self.moe_layers, "kinds": self.kinds, "has_embedding": self.has_embedding,
            "has_lm_head": self.has_lm_head, "weight_bytes": self.weight_bytes,
            "kv_cache_bytes": self.kv_cache_bytes, "state_cache_bytes": self.state_cache_bytes,
            "cache_bytes": self.cache_bytes, "total_bytes": self.total_bytes,
            "flops_per_token": self.flops_per_token,
        }
        if device_memory is not None:
            out["fits"] = self.total_bytes <= device_memory
        return out


def plan_stages(costs: ModelCosts, partition: Sequence[int]) -> list[StagePlan]:
    """What each stage of a (validated) partition holds, from the per-layer costs."""
    pp_size = len(partition)
    order = list(dict.fromkeys(costs.layer_types))  # kinds listed in the model's order on every stage
    stages = []
    for rank, (start, end) in enumerate(stage_bounds(partition)):
        position = ModelCosts.position(rank, pp_size)
        layers = range(start, end)
        kinds = {kind: n for kind in order if (n := sum(costs.layer_types[i] == kind for i in layers))}
        stages.append(StagePlan(
            pp_rank=rank, layer_start=start, layer_end=end, layer_kinds=kinds,
            moe_layers=sum(costs.layer_moe[i] for i in layers),
            has_embedding=rank == 0, has_lm_head=rank == pp_size - 1,
            weight_bytes=sum(costs.weight_bytes[i] for i in layers) + costs.extra_weight_bytes[position],
            kv_cache_bytes=sum(costs.kv_cache_bytes[i] for i in layers),
            state_cache_bytes=sum(costs.state_cache_bytes[i] for i in layers),
            flops_per_token=sum(costs.flops[i] for i in layers) + costs.extra_flops[position],
        ))
    return stages


def model_weight_bytes(costs: ModelCosts) -> int:
    """The whole text model on one TP rank (pp=1): every layer, the embedding, final norm and LM head."""
    return sum(costs.weight_bytes) + costs.extra_weight_bytes["single"]
