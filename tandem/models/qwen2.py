"""Qwen2 dense models: Llama blocks with biases on the q/k/v projections (always) and none on o_proj."""

from __future__ import annotations

from tandem.config import ModelConfig
from tandem.models.causal_lm import CausalLM
from tandem.models.common import BlockSpec


class Qwen2ForCausalLM(CausalLM):
    @classmethod
    def block_spec(cls, config: ModelConfig) -> BlockSpec:
        return BlockSpec(qkv_bias=True, o_bias=False)
