"""Qwen3-MoE: Qwen3 attention (q/k norms) with sparse MoE layers and no shared expert."""

from tandem.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    pass
