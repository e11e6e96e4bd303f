"""Qwen3.5 dense and MoE: hybrid Gated-DeltaNet linear attention + gated full attention (per `layer_types`),
zero-centred RMSNorms, partial rotary. Multimodal checkpoints keep the text model under
`model.language_model.`; their vision tower and the multi-token-prediction head are not used here."""

from tandem.models.common import CausalLM


class Qwen3_5ForCausalLM(CausalLM):
    zero_centred_norm = True
    ignorable = CausalLM.ignorable + (r"^mtp\.", r"^model\.visual\.", r"^visual\.")


class Qwen3_5MoeForCausalLM(Qwen3_5ForCausalLM):
    """Same blocks; every layer's MLP is the sparse MoE with a gated shared expert."""
