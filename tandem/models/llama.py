"""Llama-style dense models (Llama 2/3, Mistral-like): RMSNorm, SwiGLU MLP, GQA attention, llama3 rope
scaling; `attention_bias` puts biases on q/k/v and o. This is `CausalLM`'s default spec."""

from tandem.models.causal_lm import CausalLM


class LlamaForCausalLM(CausalLM):
    pass
