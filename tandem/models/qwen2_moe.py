"""Qwen2-MoE: Qwen2 attention (q/k/v biases per `qkv_bias`); sparse layers per
`decoder_sparse_step`/`mlp_only_layers` with softmax top-k routing (renormalised per `norm_topk_prob`)
and a shared expert scaled by a sigmoid gate."""

from __future__ import annotations

from tandem.config import ModelConfig
from tandem.models.causal_lm import CausalLM
from tandem.models.common import BlockSpec


class Qwen2MoeForCausalLM(CausalLM):
    @classmethod
    def block_spec(cls, config: ModelConfig) -> BlockSpec:
        qkv_bias = bool(config.hf_flag("qkv_bias", False) or config.hf_flag("attention_bias", False))
        return BlockSpec(qkv_bias=qkv_bias, norm_topk_prob=bool(config.hf_flag("norm_topk_prob", True)))
