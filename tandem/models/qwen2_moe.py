"""Qwen2-MoE: Qwen2 attention; sparse layers per `decoder_sparse_step`/`mlp_only_layers` with softmax top-k
routing (renormalised per `norm_topk_prob`) and a shared expert scaled by a sigmoid gate."""

from tandem.models.common import CausalLM


class Qwen2MoeForCausalLM(CausalLM):
    """The MoE block and its shared expert come from `tandem.layers.moe`, selected by the config."""
