"""The checkpoint-name rules every family shares: which checkpoint tensors fill which pieces of Tandem's fused
parameters (q/k/v, gate/up, experts), and back (`checkpoint_name`, for messages and for FP8's per-module
decision)."""

from __future__ import annotations

import re

from tandem.config import ModelConfig

# checkpoint name piece -> (parameter name piece, shard id)
DENSE_PACKED = {
    ".q_proj.": (".qkv_proj.", "q"), ".k_proj.": (".qkv_proj.", "k"), ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1),
}
PER_EXPERT = re.compile(r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight(_scale_inv)?$")
FUSED_EXPERT = re.compile(r"\.experts\.(gate_up_proj|down_proj)(\.weight)?$")


def checkpoint_name(config: ModelConfig, param_name: str, shard) -> str:
    """The checkpoint tensor expected to fill `shard` of a parameter (`model.*` / `lm_head.*` name)."""
    name = param_name
    if name == "lm_head.weight" and config.tie_word_embeddings:
        name = "model.embed_tokens.weight"
    elif ".experts.gate_up_proj" in name and shard is not None:
        expert, part = shard
        name = name.replace(".experts.gate_up_proj", f".experts.{expert}.{('gate_proj', 'up_proj')[part]}.weight")
    elif ".experts.down_proj" in name and shard is not None:
        name = name.replace(".experts.down_proj", f".experts.{shard}.down_proj.weight")
    else:
        for piece, (param_piece, piece_shard) in DENSE_PACKED.items():
            if param_piece in name and piece_shard == shard and ".linear_attn." not in name:
                name = name.replace(param_piece, piece)
                break
    prefix = config.weight_prefix
    return prefix + name[len("model."):] if name.startswith("model.") else name
