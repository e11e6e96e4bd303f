"""Qwen3 dense models: Llama blocks with RMSNorm on each q and k head before rope; `attention_bias` puts
biases on q/k/v."""

from __future__ import annotations

from tandem.config import ModelConfig
from tandem.models.causal_lm import CausalLM
from tandem.models.common import BlockSpec


class Qwen3ForCausalLM(CausalLM):
    @classmethod
    def block_spec(cls, config: ModelConfig) -> BlockSpec:
        return BlockSpec(qkv_bias=bool(config.hf_flag("attention_bias", False)), qk_norm=True,
                         norm_topk_prob=bool(config.hf_flag("norm_topk_prob", True)))
