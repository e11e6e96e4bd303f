"""Qwen3-MoE: Qwen3 attention (q/k norms) with sparse MoE layers and no shared expert."""

from tandem.models.common import CausalLM


class Qwen3MoeForCausalLM(CausalLM):
    """The MoE block comes from `tandem.layers.moe`, selected by the config."""
