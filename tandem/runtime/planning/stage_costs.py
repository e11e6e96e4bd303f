"""What each decoder layer costs on one device, from the model config alone: weight bytes, KV bytes per token,
linear-attention state bytes per slot, an activation estimate and FLOPs per token (`ModelCosts`).

Byte counts are exact by construction: the real Tandem model classes are built on the `meta` device (no
memory, no weights read) for a `ParallelLayout` describing TP rank 0 of the wanted layout, so a layer's weight
bytes are the same parameters `ModelRunner.weight_bytes` sums, and its cache bytes come from the same
formulas the runner's pools are allocated with (`tandem.runtime.memory.sizing`).

A stage's cost is its layers' costs plus a constant that depends only on the stage's position (the embedding
on the first stage, the final norm and LM head on the last, both when there is one stage; with NEXTN
speculative decoding, also the MTP head on the last stage: its weights and its layers' KV, which the engine
keeps in the last stage's pool)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tandem.config import EngineConfig, ModelConfig, WeightOnlySpec
from tandem.layers.paged_attention import DEFAULT_WORKSPACE_BYTES
from tandem.layers.weight_only import weight_bytes
from tandem.models.common import FULL_ATTENTION, LINEAR_ATTENTION
from tandem.models.registry import build_model
from tandem.parallel.layout import ParallelLayout
from tandem.parallel.partition import uniform_partition
from tandem.runtime.memory.sizing import layer_kv_bytes_per_token, layer_state_bytes_per_slot

FLOPS_CONTEXT = 2048  # context tokens assumed for the attention term of the compute estimate


def param_bytes(module: torch.nn.Module, weight_only: WeightOnlySpec | None = None) -> int:
    """Parameter bytes, with `--torchao-config`'s quantized linears counted as quantized (layers/weight_only.py)."""
    return weight_bytes(module, weight_only)


def build_stage_on_meta(model_config: ModelConfig, dtype: torch.dtype, tp_size: int, pp_size: int = 1,
                        pp_rank: int = 0, partition: Sequence[int] | None = None, tp_rank: int = 0,
                        mtp: bool = False):
    """The model one rank would build, with every tensor on the meta device (nothing allocated); `mtp`: with
    the MTP head on the last stage (NEXTN)."""
    partition = tuple(partition) if partition is not None else tuple(uniform_partition(model_config.num_layers,
                                                                                       pp_size))
    layout = ParallelLayout.describe(partition, tp_size, tp_rank, pp_rank)
    return build_model(model_config, layout, dtype, torch.device("meta"), mtp=mtp)


def stage_weight_bytes_on_meta(model_config: ModelConfig, dtype: torch.dtype, tp_size: int,
                               partition: Sequence[int], weight_only: WeightOnlySpec | None = None) -> list[int]:
    """Weight bytes per stage from building each stage's whole model on meta (a cross-check of the
    additive model in `model_costs`; slower, as it builds every layer once per stage)."""
    return [param_bytes(build_stage_on_meta(model_config, dtype, tp_size, len(partition), rank, partition),
                        weight_only) for rank in range(len(partition))]


@dataclass
class ModelCosts:
    """Per-layer costs on one device (TP rank 0) and the per-position constants of a stage."""

    layer_types: tuple[str, ...]
    layer_moe: tuple[bool, ...]
    dtype: torch.dtype
    weight_bytes: list[int]  # per layer
    kv_bytes_per_token: list[int]  # per layer (0 for linear-attention layers)
    state_bytes_per_slot: list[int]  # per layer (0 for full-attention layers)
    activation_bytes: list[int]  # per layer: estimated activations of the largest step
    flops: list[float]  # per layer, per token
    # extras by position: "single" (pp=1: first and last), "first", "middle", "last"
    extra_weight_bytes: dict[str, int] = field(default_factory=dict)
    extra_activation_bytes: dict[str, int] = field(default_factory=dict)
    extra_flops: dict[str, float] = field(default_factory=dict)
    extra_kv_bytes_per_token: dict[str, int] = field(default_factory=dict)  # the MTP head's layers (NEXTN)

    @property
    def num_layers(self) -> int:
        return len(self.weight_bytes)

    @staticmethod
    def position(pp_rank: int, pp_size: int) -> str:
        if pp_size == 1:
            return "single"
        return "first" if pp_rank == 0 else "last" if pp_rank == pp_size - 1 else "middle"


def _layer_flops(layer, weight_params: float, context: int) -> float:
    """2 FLOPs per active parameter, plus the attention / recurrence terms that do not live in weights."""
    flops = 2.0 * weight_params
    if layer.kind == FULL_ATTENTION:
        attn = layer.self_attn
        flops += 4.0 * attn.num_heads * attn.head_dim * context  # q.k over the context, then p.v
    elif layer.kind == LINEAR_ATTENTION:
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


def _layer_activation_bytes(layer, config: ModelConfig, itemsize: int, tokens: int, context: int) -> int:
    """Estimated activations of one layer for a step of `tokens` new tokens at the end of a `context`-token
    context: its widest outputs a few times over, the hidden state, and for attention the keys and values of
    the whole context gathered from the pool plus the causal mask; for Gated DeltaNet the float32 states."""
    widths = []
    for module in layer.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            widths.append(weight.shape[0])
    mlp = layer.mlp
    if layer.is_moe:  # tokens are gathered per expert: top_k rows each
        widths.append(config.num_experts_per_tok * 2 * mlp.experts.local_inter)
    width = max(widths)
    total = itemsize * tokens * (3 * width + 6 * config.hidden_size)
    if layer.kind == FULL_ATTENTION:
        attn = layer.self_attn
        total += 2 * context * attn.num_kv_heads * attn.head_dim * itemsize + tokens * context
    elif layer.kind == LINEAR_ATTENTION:
        gdn = layer.linear_attn
        total += 4 * gdn.num_v_heads * gdn.head_k_dim * gdn.head_v_dim * 4
    return total


def model_costs(model_config: ModelConfig, tp_size: int, dtype: torch.dtype, chunk_tokens: int = 512,
                context: int | None = None, flops_context: int = FLOPS_CONTEXT,
                weight_only: WeightOnlySpec | None = None, mtp: bool = False) -> ModelCosts:
    """Per-layer bytes and FLOPs for one TP rank, from models built on meta. Activations are estimated for a
    prefill chunk of `chunk_tokens` at the end of a `context`-token context (default the model's limit).
    With `weight_only` the quantized linears' weight bytes are those of their int8 / int4 form; with `mtp`
    the last stage holds the MTP head (NEXTN speculative decoding)."""
    context = model_config.max_position_embeddings if context is None else context
    L = model_config.num_layers
    itemsize = dtype.itemsize
    full = build_stage_on_meta(model_config, dtype, tp_size, mtp=mtp)
    layers = full.model.layers
    weights, kv, state, activations, flops = [], [], [], [], []
    for i in range(L):
        layer = layers[i]
        weights.append(param_bytes(layer, weight_only))
        kv.append(layer_kv_bytes_per_token(layer, model_config, dtype))
        state.append(layer_state_bytes_per_slot(layer, model_config, dtype))
        activations.append(_layer_activation_bytes(layer, model_config, itemsize, chunk_tokens, context))
        flops.append(_layer_flops(layer, _active_params(layer, model_config), flops_context))
    head_rows = full.lm_head.weight.shape[0]
    head_flops = 2.0 * head_rows * model_config.hidden_size  # logits for the sampled token
    extra_bytes = {"single": param_bytes(full, weight_only) - sum(weights)}
    if L >= 2:
        first = build_stage_on_meta(model_config, dtype, tp_size, 2, 0, (1, L - 1), mtp=mtp)
        last = build_stage_on_meta(model_config, dtype, tp_size, 2, 1, (L - 1, 1), mtp=mtp)
        extra_bytes["first"] = param_bytes(first, weight_only) - weights[0]
        extra_bytes["last"] = param_bytes(last, weight_only) - weights[L - 1]
    if L >= 3:
        middle = build_stage_on_meta(model_config, dtype, tp_size, 3, 1, (1, 1, L - 2), mtp=mtp)
        extra_bytes["middle"] = param_bytes(middle, weight_only) - weights[1]
    # logits and log-softmax of every row of a chunk (prompt logprobs), float32, over the whole vocabulary
    logits = 3 * chunk_tokens * model_config.vocab_size * 4
    extra_activation = {"single": DEFAULT_WORKSPACE_BYTES + logits, "first": DEFAULT_WORKSPACE_BYTES,
                        "middle": DEFAULT_WORKSPACE_BYTES, "last": DEFAULT_WORKSPACE_BYTES + logits}
    extra_flops = {"single": head_flops, "first": 0.0, "middle": 0.0, "last": head_flops}
    head = getattr(full, "mtp", None)
    mtp_kv = sum(layer_kv_bytes_per_token(layer, model_config, dtype) for layer in head.layers) if head else 0
    moe = tuple(model_config.is_moe_layer(i) for i in range(L))
    return ModelCosts(tuple(model_config.layer_types), moe, dtype, weights, kv, state, activations, flops,
                      extra_bytes, extra_activation, extra_flops, {"single": mtp_kv, "last": mtp_kv})


def costs_for(config: EngineConfig) -> ModelCosts:
    """The costs of the engine `config` describes (its TP size, dtype, `--torchao-config`, prefill chunk,
    context length and NEXTN's MTP head)."""
    mtp = config.speculative is not None and config.speculative.algorithm == "NEXTN"
    return model_costs(config.model, config.args.tp_size, config.dtype, config.args.chunked_prefill_size,
                       config.context_length, weight_only=config.args.weight_only(), mtp=mtp)


def model_weight_bytes(costs: ModelCosts) -> int:
    """The whole text model on one TP rank (pp=1): every layer, the embedding, final norm and LM head."""
    return sum(costs.weight_bytes) + costs.extra_weight_bytes["single"]
