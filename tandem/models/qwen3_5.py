"""Qwen3.5 dense and MoE: hybrid Gated-DeltaNet linear attention + gated full attention (per `layer_types`),
zero-centred RMSNorms, q/k norms, partial rotary; MoE layers always renormalise their top-k weights.
Multimodal checkpoints keep the text model under `model.language_model.`; their vision tower is not used here.
The multi-token-prediction head (`mtp.*`) is built and read only with `mtp=True` (`models/mtp.py`)."""

from __future__ import annotations

from tandem.config import ModelConfig
from tandem.models.causal_lm import CausalLM
from tandem.models.common import BlockSpec
from tandem.models.mtp import WithMTP


class Qwen3_5ForCausalLM(WithMTP, CausalLM):
    ignorable = CausalLM.ignorable + (r"^mtp\.", r"^model\.visual\.", r"^visual\.")

    @classmethod
    def block_spec(cls, config: ModelConfig) -> BlockSpec:
        return BlockSpec(qkv_bias=bool(config.hf_flag("attention_bias", False)), qk_norm=True,
                         attn_output_gate=bool(config.hf_flag("attn_output_gate", True)),
                         zero_centred_norm=True, norm_topk_prob=True)


class Qwen3_5MoeForCausalLM(Qwen3_5ForCausalLM):
    """Same blocks; every layer's MLP is the sparse MoE with a gated shared expert."""
