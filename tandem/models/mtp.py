"""Qwen3.5's multi-token-prediction head (`mtp.*`; SGLang's NEXTN draft), built on the last stage when
speculation asks for it, and the checkpoint rules that read its tensors then and only then.

The structure, as vLLM's `Qwen3_5MultiTokenPredictor` and SGLang's `Qwen3NextForCausalLMMTP` run it: for the
hidden state h_t that the model's last stage gives at position t (after its final norm) and the token x_{t+1}
that follows,
    u = fc(concat(pre_fc_norm_embedding(embed(x_{t+1})), pre_fc_norm_hidden(h_t)))    # fc.weight [H, 2H]
    u = layers[step](u)                # a full-attention decoder layer, MoE when the model is
    logits = lm_head(norm(u))          # a draft of x_{t+2}
with the model's own embedding and LM head. MTP layer i is global layer index num_layers + i (vLLM's
convention): its keys and values live in the last stage's KV pool under that index (`MTPHead.layer_ids`),
in pages of their own. Positions are the target's (t for the row of h_t), as vLLM passes them.

`WithMTP` is the mixin a family puts before `CausalLM`: `mtp=True` builds the head on the last stage and makes
the `mtp.*` names (top-level in multimodal checkpoints too) owned by that stage, so an incomplete set is the
loader's CheckpointError naming the missing tensor; a last stage that is not the first also reads
`embed_tokens` for the head (with tied embeddings it shares the LM head's copy). Without it, `mtp.*` stays
ignorable and is never read."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from tandem.config import ModelConfig
from tandem.errors import ConfigError
from tandem.layers.embedding import VocabParallelEmbedding
from tandem.layers.forward_batch import ForwardBatch
from tandem.layers.linear import ReplicatedLinear
from tandem.layers.norm import RMSNorm
from tandem.layers.rotary import RotaryEmbedding
from tandem.models.common import BlockSpec, DecoderLayer
from tandem.parallel.layout import ParallelLayout

MTP_EMBEDDING = "mtp.embed_tokens.weight"


class MTPHead(nn.Module):
    """`mtp.*` of the checkpoint. `own_embedding`: a last stage that is not also the first has no embedding of
    the model's to share, so the head holds one."""

    def __init__(self, config: ModelConfig, layout: ParallelLayout, spec: BlockSpec, own_embedding: bool):
        super().__init__()
        tp, hidden = layout.tp, config.hidden_size
        norm = lambda: RMSNorm(hidden, config.rms_norm_eps, zero_centred=spec.zero_centred_norm)
        self.pre_fc_norm_embedding = norm()
        self.pre_fc_norm_hidden = norm()
        self.fc = ReplicatedLinear(2 * hidden, hidden)  # [H, 2H]: small, so every TP rank holds all of it
        self.layer_ids = [config.num_layers + i for i in range(config.mtp_num_hidden_layers)]
        layer_config = mtp_layer_config(config)
        self.layers = nn.ModuleList(DecoderLayer(tp, layer_config, spec, i) for i in self.layer_ids)
        self.norm = norm()
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_parameters, config.partial_rotary_factor,
                                      config.hf_config)
        self.embed_tokens = VocabParallelEmbedding(tp, config.vocab_size, hidden) if own_embedding else None

    def forward(self, batch: ForwardBatch, hidden: torch.Tensor, embed_tokens: nn.Module, step: int = 0):
        """batch.input_ids [T]: the tokens that follow each row's position; hidden [T, H]: the model's final
        hidden states at those positions. Returns the head's normed hidden states [T, H] (logits: the LM head)."""
        embeds = embed_tokens(batch.input_ids)
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        cos_sin = self.rotary.cos_sin(batch.positions, x.dtype)
        x, residual = self.layers[step % len(self.layers)](x, None, batch, self.rotary, cos_sin)
        x, _ = self.norm(x, residual)
        return x


def mtp_layer_config(config: ModelConfig) -> ModelConfig:
    """The model's config with the MTP layers' indices (num_layers + i) added: full attention, MoE when the
    model is, so that the shared `DecoderLayer` builds them."""
    extra = config.mtp_num_hidden_layers
    return dataclasses.replace(config, layer_types=config.layer_types + ("full_attention",) * extra,
                               moe_layers=config.moe_layers + (True,) * extra if config.is_moe else ())


class WithMTP:
    """Mixin for a `CausalLM` family whose checkpoints carry `mtp.*` (put it first among the bases)."""

    def __init__(self, config: ModelConfig, layout: ParallelLayout, mtp: bool = False):
        super().__init__(config, layout)
        self.mtp_enabled = mtp
        self.mtp = None
        if not mtp:
            return
        if config.mtp_num_hidden_layers < 1:
            raise ConfigError("speculative decoding with the MTP head (NEXTN) needs a checkpoint that has one: "
                              "its config's mtp_num_hidden_layers is 0")
        if layout.pp.is_last:
            own = not layout.pp.is_first
            self.mtp = MTPHead(config, layout, self.spec, own_embedding=own)
            if own and config.tie_word_embeddings:
                self.mtp.embed_tokens.weight = self.lm_head.weight  # one tensor, loaded once (as the LM head)

    def mtp_embedding(self) -> nn.Module:
        return self.model.embed_tokens if self.layout.pp.is_first else self.mtp.embed_tokens

    def mtp_forward(self, batch: ForwardBatch, hidden: torch.Tensor, step: int = 0) -> torch.Tensor:
        """The MTP head over `batch` (its own step: the next tokens, the target's positions); logits through
        `compute_logits`. Only on the last stage, with mtp=True."""
        if self.mtp is None:
            raise RuntimeError("this stage has no MTP head: it is built on the last stage with mtp=True")
        return self.mtp(batch, hidden, self.mtp_embedding(), step)

    # ---- checkpoint names -------------------------------------------------------------------------
    def _head_reads_embedding(self) -> bool:
        """The head's own embedding is filled from `embed_tokens` (untied; tied shares the LM head's)."""
        return self.mtp is not None and self.mtp.embed_tokens is not None and not self.config.tie_word_embeddings

    def normalize_name(self, name: str) -> str | None:
        if self.mtp_enabled and name.startswith("mtp."):
            return name  # top-level in text and multimodal checkpoints alike
        return super().normalize_name(name)

    def owns(self, name: str) -> bool:
        if name.startswith("mtp."):
            return self.mtp is not None
        if name.startswith("model.embed_tokens.") and self._head_reads_embedding():
            return True
        return super().owns(name)

    def targets(self, name: str) -> list[tuple[str, object]]:
        out = super().targets(name)
        if name == "model.embed_tokens.weight" and self._head_reads_embedding():
            out = out + [(MTP_EMBEDDING, None)]
        return out

    def checkpoint_name_of(self, param_name: str, shard) -> str:
        if param_name == MTP_EMBEDDING:
            param_name = "model.embed_tokens.weight"
        return super().checkpoint_name_of(param_name, shard)
