"""Llama-style dense models (Llama 2/3, Mistral-like): RMSNorm, SwiGLU MLP, GQA attention, llama3 rope scaling."""

from tandem.models.common import CausalLM


class LlamaForCausalLM(CausalLM):
    """Everything is the shared block; the family's differences come from its config."""
