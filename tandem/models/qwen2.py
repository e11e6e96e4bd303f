"""Qwen2 dense models: Llama blocks with biases on the q/k/v projections (config-driven)."""

from tandem.models.common import CausalLM


class Qwen2ForCausalLM(CausalLM):
    """Everything is the shared block; the family's differences come from its config."""
