"""`CausalLM`: one rank's stage of a decoder-only model (the `DecoderModel` stack plus the LM head on the
last stage) and the checkpoint-name rules every family shares: normalising multimodal prefixes, mapping
checkpoint tensors to fused parameters (q/k/v, gate/up, experts), and deciding ownership from a name alone."""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from tandem.config import ModelConfig
from tandem.layers.embedding import ParallelLMHead
from tandem.layers.forward_batch import ForwardBatch
from tandem.models.checkpoint_names import DENSE_PACKED, FUSED_EXPERT, PER_EXPERT, checkpoint_name
from tandem.models.common import BlockSpec, DecoderModel
from tandem.parallel.layout import ParallelLayout
from tandem.parallel.partition import PPMissingLayer


class CausalLM(nn.Module):
    """Decoder stack + LM head for one rank's stage. A family subclasses it and overrides `block_spec` (its
    blocks' differences, read from its config) and, where needed, `ignorable` name patterns."""

    # checkpoint tensors that are not part of the text model (never read)
    ignorable: tuple[str, ...] = (r"(^|\.)rotary_emb\.inv_freq$",)

    @classmethod
    def block_spec(cls, config: ModelConfig) -> BlockSpec:
        """Llama's rule: one `attention_bias` flag for q/k/v and o, `mlp_bias` for the MLP."""
        bias = bool(config.hf_flag("attention_bias", False))
        return BlockSpec(qkv_bias=bias, o_bias=bias, mlp_bias=bool(config.hf_flag("mlp_bias", False)),
                         norm_topk_prob=bool(config.hf_flag("norm_topk_prob", True)))

    def __init__(self, config: ModelConfig, layout: ParallelLayout):
        super().__init__()
        self.config, self.layout = config, layout
        pp, tp = layout.pp, layout.tp
        self.spec = self.block_spec(config)
        self.model = DecoderModel(layout, config, self.spec)
        if not pp.is_last:
            self.lm_head = PPMissingLayer("lm_head")
        elif config.tie_word_embeddings and pp.is_first:
            self.lm_head = ParallelLMHead(tp, config.vocab_size, config.hidden_size)
            self.lm_head.weight = self.model.embed_tokens.weight  # one tensor, loaded once
        else:
            self.lm_head = ParallelLMHead(tp, config.vocab_size, config.hidden_size)

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
        pp = self.layout.pp
        if name == "model.embed_tokens.weight":
            out = [(name, None)] if pp.is_first else []
            if self.config.tie_word_embeddings and pp.is_last and not pp.is_first:
                out.append(("lm_head.weight", None))
            return out
        match = PER_EXPERT.search(name)
        if match:
            expert, which = int(match.group(1)), match.group(2)
            base, scale = name[: match.start()] + ".experts.", match.group(3) or ""  # FP8 block scales
            if which == "down_proj":
                return [(base + "down_proj" + scale, expert)]
            return [(base + "gate_up_proj" + scale, (expert, 0 if which == "gate_proj" else 1))]
        match = FUSED_EXPERT.search(name)
        if match:
            return [(name[: match.start()] + ".experts." + match.group(1), None)]
        for piece, (param_piece, shard) in DENSE_PACKED.items():
            if piece in name and ".linear_attn." not in name:
                return [(name.replace(piece, param_piece), shard)]
        return [(name, None)]

    def owns(self, name: str) -> bool:
        """Whether this stage owns a normalised checkpoint tensor (decided from the name alone)."""
        pp = self.layout.pp
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

    def checkpoint_name_of(self, param_name: str, shard) -> str:
        """The checkpoint tensor expected to fill `shard` of a parameter (for error messages)."""
        return checkpoint_name(self.config, param_name, shard)
