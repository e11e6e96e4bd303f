"""Blocks shared by every supported family: attention, dense MLP, decoder layer and the stage-aware decoder
stack, configured by a family's `BlockSpec`.

A stack holds only its stage's parts: the embedding on the first stage, layers [start, end) (others are
`PPMissingLayer`), the final norm on the last stage. Which stage it is comes from the `ParallelLayout`
passed in."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem.config import ModelConfig
from tandem.layers.embedding import VocabParallelEmbedding
from tandem.layers.forward_batch import ForwardBatch
from tandem.layers.gated_delta_net import GatedDeltaNet
from tandem.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from tandem.layers.moe import SparseMoE
from tandem.layers.norm import RMSNorm
from tandem.layers.paged_attention import paged_attention
from tandem.layers.rotary import RotaryEmbedding
from tandem.models.fp8_weights import quantize_layer
from tandem.parallel.layout import GroupInfo, ParallelLayout
from tandem.parallel.partition import PPMissingLayer, make_layers


# A decoder layer's token mixer: the kind its cache is sized by (a KV cache, or a linear-attention state)
FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"


@dataclass(frozen=True)
class BlockSpec:
    """What differs between families' blocks; each model class builds one from its config."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    attn_output_gate: bool = False  # Qwen3.5: q_proj also emits a per-head sigmoid gate of the output
    zero_centred_norm: bool = False  # Qwen3.5: (1 + w) * norm(x)
    norm_topk_prob: bool = True  # MoE: renormalise the top-k routing weights


class MLP(nn.Module):
    def __init__(self, tp: GroupInfo, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(tp, hidden_size, [intermediate_size, intermediate_size],
                                                       bias=bias)
        self.down_proj = RowParallelLinear(tp, intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Attention(nn.Module):
    """Full attention with optional q/k norms and Qwen3.5's per-head sigmoid output gate."""

    def __init__(self, tp: GroupInfo, config: ModelConfig, spec: BlockSpec, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.gated = spec.attn_output_gate
        q_width = 2 * config.head_dim if self.gated else config.head_dim
        self.qkv_proj = QKVParallelLinear(tp, config.hidden_size, config.head_dim, config.num_heads,
                                          config.num_kv_heads, bias=spec.qkv_bias, q_width=q_width)
        self.o_proj = RowParallelLinear(tp, config.num_heads * config.head_dim, config.hidden_size, bias=spec.o_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        if spec.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, zero_centred=spec.zero_centred_norm)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, zero_centred=spec.zero_centred_norm)
        else:
            self.q_norm = self.k_norm = None
        self.scaling = config.head_dim ** -0.5

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rotary: RotaryEmbedding, cos_sin) -> torch.Tensor:
        num_tokens = x.shape[0]
        q_part, k, v = self.qkv_proj(x).split(
            [self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)
        gate = None
        if self.gated:
            # q_proj emits [q | gate] per head
            q_part = q_part.view(num_tokens, self.num_heads, 2 * self.head_dim)
            q, gate = q_part.chunk(2, dim=-1)
            gate = gate.reshape(num_tokens, self.num_heads * self.head_dim)
        else:
            q = q_part.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(q, k, cos_sin)
        k_cache, v_cache = batch.kv_pool.layer(self.layer_idx)
        out = paged_attention(q, k, v, k_cache, v_cache, batch.attn, self.scaling, batch.kv_pool.workspace)
        out = out.reshape(num_tokens, self.num_heads * self.head_dim)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    """Pre-norm block: token mixer (full attention or Gated DeltaNet), then MLP (dense or MoE). `kind` says
    which mixer (`FULL_ATTENTION`: `self_attn`, `LINEAR_ATTENTION`: `linear_attn`) and `is_moe` which MLP;
    the cache sizing and the planner read these, not the attribute names."""

    def __init__(self, tp: GroupInfo, config: ModelConfig, spec: BlockSpec, layer_idx: int):
        super().__init__()
        linear = config.layer_types[layer_idx] == LINEAR_ATTENTION
        self.kind = LINEAR_ATTENTION if linear else FULL_ATTENTION
        self.is_moe = config.is_moe_layer(layer_idx)
        norm = lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, zero_centred=spec.zero_centred_norm)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        if linear:
            self.linear_attn = GatedDeltaNet(tp, config, layer_idx)
        else:
            self.self_attn = Attention(tp, config, spec, layer_idx)
        if self.is_moe:
            self.mlp = SparseMoE(tp, config, spec.norm_topk_prob, lambda size: MLP(tp, config.hidden_size, size))
        else:
            self.mlp = MLP(tp, config.hidden_size, config.intermediate_size, bias=spec.mlp_bias)

    def forward(self, hidden, residual, batch: ForwardBatch, rotary, cos_sin):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        if self.kind == LINEAR_ATTENTION:
            hidden = self.linear_attn(hidden, batch)
        else:
            hidden = self.self_attn(hidden, batch, rotary, cos_sin)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    """`model.*` of the checkpoint: embedding (first stage), this stage's layers, final norm (last stage)."""

    def __init__(self, layout: ParallelLayout, config: ModelConfig, spec: BlockSpec):
        super().__init__()
        pp, tp = layout.pp, layout.tp
        self.config = config
        self.is_first, self.is_last = pp.is_first, pp.is_last
        self.embed_tokens = (VocabParallelEmbedding(tp, config.vocab_size, config.hidden_size)
                             if pp.is_first else PPMissingLayer("embed_tokens"))
        self.start, self.end, self.layers = make_layers(
            layout, config.num_layers, lambda i: quantize_layer(DecoderLayer(tp, config, spec, i), config, i))
        self.norm = (RMSNorm(config.hidden_size, config.rms_norm_eps, zero_centred=spec.zero_centred_norm)
                     if pp.is_last else PPMissingLayer("norm"))
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_parameters, config.partial_rotary_factor,
                                      config.hf_config)

    def forward(self, batch: ForwardBatch, hidden=None, residual=None):
        if self.is_first:
            hidden = self.embed_tokens(batch.input_ids)
        dtype = hidden.dtype
        cos_sin = self.rotary.cos_sin(batch.positions, dtype)
        for layer in self.layers[self.start:self.end]:
            hidden, residual = layer(hidden, residual, batch, self.rotary, cos_sin)
        if self.is_last:
            hidden, _ = self.norm(hidden, residual)
            return hidden, None
        return hidden, residual
