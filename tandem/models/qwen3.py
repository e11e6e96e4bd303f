"""Qwen3 dense models: Llama blocks with RMSNorm on each q and k head before rope."""

from tandem.models.common import CausalLM


class Qwen3ForCausalLM(CausalLM):
    """Everything is the shared block; the family's differences come from its config."""
