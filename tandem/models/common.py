"""Blocks shared by every supported family: attention, dense MLP, decoder layer, the stage-aware decoder
stack and the causal-LM wrapper with its checkpoint-name mapping.

A model holds only its stage's parts: the embedding on the first stage, layers [start, end) (others are
`PPMissingLayer`), the final norm and LM head on the last stage."""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem.config import ModelConfig
from tandem.layers.attention import cached_causal_attention
from tandem.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tandem.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from tandem.layers.norm import RMSNorm
from tandem.layers.rotary import RotaryEmbedding
from tandem.parallel.partition import PPMissingLayer, make_layers
from tandem.parallel.state import get_pp
from tandem.runtime.batch import ForwardBatch


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size, intermediate_size], bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Attention(nn.Module):
    """Full attention with optional q/k norms and Qwen3.5's per-head sigmoid output gate."""

    def __init__(self, config: ModelConfig, layer_idx: int, zero_centred_norm: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.gated = config.attn_output_gate
        q_width = 2 * config.head_dim if self.gated else config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads,
                                          bias=config.qkv_bias, q_width=q_width)
        self.o_proj = RowParallelLinear(config.num_heads * config.head_dim, config.hidden_size, bias=config.o_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, zero_centred=zero_centred_norm)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, zero_centred=zero_centred_norm)
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
        k_cache, v_cache = batch.kv_cache.layer(self.layer_idx)
        out = cached_causal_attention(q, k, v, batch, k_cache, v_cache, self.scaling)
        out = out.reshape(num_tokens, self.num_heads * self.head_dim)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    """Pre-norm block: token mixer (full attention or Gated DeltaNet), then MLP (dense or MoE)."""

    zero_centred_norm = False

    def __init__(self, config: ModelConfig, layer_idx: int, zero_centred_norm: bool = False):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        norm = lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, zero_centred=zero_centred_norm)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        if self.layer_type == "linear_attention":
            from tandem.layers.gated_delta_net import GatedDeltaNet

            self.linear_attn = GatedDeltaNet(config, layer_idx)
        else:
            self.self_attn = Attention(config, layer_idx, zero_centred_norm)
        if config.is_moe_layer(layer_idx):
            from tandem.layers.moe import SparseMoE

            self.mlp = SparseMoE(config, lambda size: MLP(config.hidden_size, size))
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)

    def forward(self, hidden, residual, batch: ForwardBatch, rotary, cos_sin):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        if self.layer_type == "linear_attention":
            hidden = self.linear_attn(hidden, batch)
        else:
            hidden = self.self_attn(hidden, batch, rotary, cos_sin)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    """`model.*` of the checkpoint: embedding (first stage), this stage's layers, final norm (last stage)."""

    def __init__(self, config: ModelConfig, zero_centred_norm: bool):
        super().__init__()
        pp = get_pp()
        self.config = config
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size)
                             if pp.is_first else PPMissingLayer("embed_tokens"))
        self.start, self.end, self.layers = make_layers(
            config.num_layers, lambda i: DecoderLayer(config, i, zero_centred_norm))
        self.norm = (RMSNorm(config.hidden_size, config.rms_norm_eps, zero_centred=zero_centred_norm)
                     if pp.is_last else PPMissingLayer("norm"))
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_parameters, config.partial_rotary_factor,
                                      config.hf_config)

    def forward(self, batch: ForwardBatch, hidden=None, residual=None):
        if get_pp().is_first:
            hidden = self.embed_tokens(batch.input_ids)
        dtype = hidden.dtype
        cos_sin = self.rotary.cos_sin(batch.positions, dtype)
        for layer in self.layers[self.start:self.end]:
            hidden, residual = layer(hidden, residual, batch, self.rotary, cos_sin)
        if get_pp().is_last:
            hidden, _ = self.norm(hidden, residual)
            return hidden, None
        return hidden, residual


# checkpoint name piece -> (parameter name piece, shard id)
DENSE_PACKED = {
    ".q_proj.": (".qkv_proj.", "q"), ".k_proj.": (".qkv_proj.", "k"), ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1),
}
PER_EXPERT = re.compile(r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
FUSED_EXPERT = re.compile(r"\.experts\.(gate_up_proj|down_proj)(\.weight)?$")


class CausalLM(nn.Module):
    """Decoder stack + LM head. Subclasses set `zero_centred_norm` and `ignorable` name patterns."""

    zero_centred_norm = False
    # checkpoint tensors that are not part of the text model (never read)
    ignorable: tuple[str, ...] = (r"(^|\.)rotary_emb\.inv_freq$",)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        pp = get_pp()
        self.model = DecoderModel(config, self.zero_centred_norm)
        if not pp.is_last:
            self.lm_head = PPMissingLayer("lm_head")
        elif config.tie_word_embeddings and pp.is_first:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
            self.lm_head.weight = self.model.embed_tokens.weight  # one tensor, loaded once
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)

    @property
    def layer_range(self) -> tuple[int, int]:
        return self.model.start, self.model.end

    def forward(self, batch: ForwardBatch, hidden=None, residual=None):
        return self.model(batch, hidden, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # ---- checkpoint names -------------------------------------------------------------------------
    def normalize_name(self, name: str) -> str | None:
        """Checkpoint name -> the text model's `model.*`/`lm_head.*` name, or None if ignorable."""
        if any(re.search(pattern, name) for pattern in self.ignorable):
            return None
        prefix = self.config.weight_prefix
        if prefix != "model." and name.startswith(prefix):
            return "model." + name[len(prefix):]
        return name

    def targets(self, name: str) -> list[tuple[str, object]]:
        """Normalised checkpoint name -> [(parameter name, shard id)] on this stage (may be empty)."""
        pp = get_pp()
        if name == "model.embed_tokens.weight":
            out = [(name, None)] if pp.is_first else []
            if self.config.tie_word_embeddings and pp.is_last and not pp.is_first:
                out.append(("lm_head.weight", None))
            return out
        match = PER_EXPERT.search(name)
        if match:
            expert, which = int(match.group(1)), match.group(2)
            base = name[: match.start()] + ".experts."
            if which == "down_proj":
                return [(base + "down_proj", expert)]
            return [(base + "gate_up_proj", (expert, 0 if which == "gate_proj" else 1))]
        match = FUSED_EXPERT.search(name)
        if match:
            return [(name[: match.start()] + ".experts." + match.group(1), None)]
        for piece, (param_piece, shard) in DENSE_PACKED.items():
            if piece in name and ".linear_attn." not in name:
                return [(name.replace(piece, param_piece), shard)]
        return [(name, None)]

    def owns(self, name: str) -> bool:
        """Whether this stage owns a normalised checkpoint tensor (decided from the name alone)."""
        pp = get_pp()
        match = re.match(r"model\.layers\.(\d+)\.", name)
        if match:
            index = int(match.group(1))
            if index >= self.config.num_layers:
                return True  # a layer the model does not have: reported as unexpected, never silently dropped
            return self.model.start <= index < self.model.end
        if name.startswith("model.embed_tokens."):
            return pp.is_first or (self.config.tie_word_embeddings and pp.is_last)
        if name.startswith("lm_head."):
            # with tied embeddings the head is loaded from embed_tokens.weight
            return pp.is_last and not self.config.tie_word_embeddings
        if name.startswith("model.norm."):
            return pp.is_last
        return True  # unknown names are owned by everyone, so they are reported, never silently dropped


def checkpoint_name_of(model: CausalLM, param_name: str, shard) -> str:
    """The checkpoint tensor expected to fill `shard` of a parameter (for error messages)."""
    name = param_name
    if name == "lm_head.weight" and model.config.tie_word_embeddings:
        name = "model.embed_tokens.weight"
    elif ".experts.gate_up_proj" in name and shard is not None:
        expert, part = shard
        name = name.replace(".experts.gate_up_proj", f".experts.{expert}.{('gate_proj', 'up_proj')[part]}.weight")
    elif ".experts.down_proj" in name and shard is not None:
        name = name.replace(".experts.down_proj", f".experts.{shard}.down_proj.weight")
    else:
        for piece, (param_piece, piece_shard) in DENSE_PACKED.items():
            if param_piece in name and piece_shard == shard and ".linear_attn." not in name:
                name = name.replace(param_piece, piece)
                break
    prefix = model.config.weight_prefix
    return prefix + name[len("model."):] if name.startswith("model.") else name
