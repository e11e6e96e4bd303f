"""What one rank of a stage must hold, computed by hand from config.json and the checkpoint's safetensors
headers (never from Tandem's planner): its weight bytes (owned tensors, TP-sharded ones split), its KV and
linear-attention state bytes per token / slot, and the pools for a given token and request count."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from support.checkpoints import checkpoint_tensor_names

LAYER = re.compile(r"layers\.(\d+)\.")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# tensors every TP rank holds whole: norms (hidden, head_dim or value-head sized), the MoE router and the
# shared expert's gate; every other tensor is split evenly over the TP ranks
REPLICATED = re.compile(r"(norm\.weight|layernorm\.weight|mlp\.gate\.weight|shared_expert_gate\.weight)$")


def text_config(model_dir: Path) -> tuple[dict, dict]:
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    return raw.get("text_config", raw), raw


def layer_types(text: dict) -> list[str]:
    return text.get("layer_types") or ["full_attention"] * text["num_hidden_layers"]


def owned(name: str, start: int, end: int, first: bool, last: bool, tied: bool) -> bool:
    """Whether the stage holding layers [start, end) (and the embedding if first, the head if last) holds
    `name`; a tied last stage holds the embedding matrix as its LM head."""
    layer = LAYER.search(name)
    if layer:
        return start <= int(layer.group(1)) < end
    if "embed_tokens" in name:
        return first or (tied and last)
    if name.endswith("norm.weight"):
        return last
    if name.startswith("lm_head"):
        return last and not tied
    raise AssertionError(f"unclassified tensor {name}")


def weight_bytes(model_dir: Path, start: int, end: int, first: bool, last: bool, tp: int, elem: int,
                 mtp: bool = False) -> int:
    """With `mtp` (NEXTN) the last stage also holds the `mtp.*` tensors (`mtp.fc` whole on every TP rank) and,
    when it is not the first stage and the embeddings are not tied, its own copy of the embedding."""
    text, raw = text_config(model_dir)
    tied = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    total = 0
    for name, (shape, _) in checkpoint_tensor_names(model_dir).items():
        if name.startswith("mtp."):
            held = mtp and last
        elif mtp and last and not first and not tied and "embed_tokens" in name and "visual" not in name:
            held = True  # the MTP head's embedding (the first stage has the model's)
        else:
            held = not name.startswith("model.visual.") and owned(name, start, end, first, last, tied)
        if not held:
            continue
        count = math.prod(shape)
        if not (REPLICATED.search(name) or name == "mtp.fc.weight"):
            assert count % tp == 0, name
            count //= tp
        total += count * elem
    return total


def kv_bytes_per_token(text: dict, start: int, end: int, tp: int, elem: int, mtp_layers: int = 0) -> int:
    """`mtp_layers`: the MTP head's layers on this stage (full attention, their KV in the stage's pool)."""
    full = layer_types(text)[start:end].count("full_attention") + mtp_layers
    heads = max(1, text["num_key_value_heads"] // tp)  # fewer KV heads than ranks: replicated
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    return full * 2 * heads * head_dim * elem


def state_bytes_per_slot(text: dict, start: int, end: int, tp: int, elem: int) -> int:
    linear = layer_types(text)[start:end].count("linear_attention")
    if not linear:
        return 0
    nk, nv = text["linear_num_key_heads"] // tp, text["linear_num_value_heads"] // tp
    dk, dv = text["linear_key_head_dim"], text["linear_value_head_dim"]
    conv = (2 * nk * dk + nv * dv) * (text["linear_conv_kernel_dim"] - 1) * elem
    recurrent = nv * dk * dv * 4  # the recurrent state is always float32
    return linear * (conv + recurrent)


def rank_figures(model_dir: Path, start: int, end: int, pp_rank: int, pp: int, tp: int, dtype: str,
                 tokens: int, requests: int, radix_cache: bool = True, mtp: bool = False) -> dict:
    """The stage_report() figures of a rank of the stage [start, end) with `tokens` KV tokens given and
    `requests` running requests (hybrid models with the radix cache: a snapshot slot per request); `mtp`:
    NEXTN speculative decoding (the MTP head on the last stage)."""
    text, _ = text_config(model_dir)
    elem = DTYPE_BYTES[dtype]
    hybrid = "linear_attention" in layer_types(text)
    slots = requests * (2 if hybrid and radix_cache else 1)
    last = pp_rank == pp - 1
    per_token = kv_bytes_per_token(text, start, end, tp, elem, text.get("mtp_num_hidden_layers", 0) if mtp and last else 0)
    per_slot = state_bytes_per_slot(text, start, end, tp, elem)
    return {"layer_start": start, "layer_end": end,
            "weight_bytes": weight_bytes(model_dir, start, end, pp_rank == 0, last, tp, elem, mtp),
            "kv_bytes_per_token": per_token, "kv_cache_bytes": tokens * per_token,
            "state_bytes_per_slot": per_slot, "state_slots": slots, "state_cache_bytes": slots * per_slot,
            "max_total_tokens": tokens, "stage_max_total_tokens": tokens, "max_running_requests": requests}
