"""stage_report() of a single-process engine, checked against figures computed independently from the
safetensors headers and config.json: layer range, weight bytes in the engine dtype (text-model tensors only,
a tied embedding counted once), cache bytes, and the tensors read.

The memory model: the KV pool holds max_total_tokens tokens of keys and values for every full-attention layer;
the linear-attention state pool holds one slot per running request, plus one more per request for the radix
cache's state snapshots on hybrid models."""

import json
import math

import pytest

from support.checkpoints import checkpoint_tensor_names
from tandem.engine import Engine

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
REQUESTS, TOKENS = 3, 288


def text_config(model_dir) -> dict:
    raw = json.loads((model_dir / "config.json").read_text())
    return raw.get("text_config", raw), raw


def text_tensors(model_dir) -> dict:
    """Checkpoint tensors of the text model: no MTP head, no vision tower; the tied LM head once."""
    text, raw = text_config(model_dir)
    names = {name: info for name, info in checkpoint_tensor_names(model_dir).items()
             if not name.startswith(("mtp.", "model.visual.", "visual."))}
    if raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False)):
        names.pop("lm_head.weight", None)
    return names


def expected_cache_bytes(model_dir, dtype_bytes: int) -> tuple[int, int]:
    text, _ = text_config(model_dir)
    layer_types = text.get("layer_types") or ["full_attention"] * text["num_hidden_layers"]
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    full = layer_types.count("full_attention")
    linear = layer_types.count("linear_attention")
    kv = TOKENS * full * 2 * text["num_key_value_heads"] * head_dim * dtype_bytes
    slots = REQUESTS * (2 if linear else 1)  # hybrid: a snapshot slot per request for the prefix cache
    state = 0
    if linear:
        key_dim = text["linear_num_key_heads"] * text["linear_key_head_dim"]
        value_dim = text["linear_num_value_heads"] * text["linear_value_head_dim"]
        conv = (2 * key_dim + value_dim) * (text["linear_conv_kernel_dim"] - 1) * dtype_bytes
        recurrent = text["linear_num_value_heads"] * text["linear_key_head_dim"] * text["linear_value_head_dim"] * 4
        state = linear * slots * (conv + recurrent)  # the recurrent state is always float32
    return kv, state, slots


CASES = {
    "qwen3_5_moe_mm_mtp": ("qwen3_5_moe", dict(multimodal=True, add_mtp=True)),
    "llama": ("llama", {}),
    "qwen3_5_tied": ("qwen3_5", dict(tied=True)),
    "llama_bf16_ckpt": ("llama", dict(dtype="bfloat16")),
}


@pytest.mark.parametrize("engine_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", ["qwen3_5_moe_mm_mtp", "llama", "qwen3_5_tied"])
def test_stage_report(ckpt, case, engine_dtype):
    kind, kw = CASES[case]
    model_dir = ckpt(kind, **kw)
    check_report(model_dir, engine_dtype, engine_dtype)


def test_stage_report_auto_dtype_of_bf16_checkpoint(ckpt):
    kind, kw = CASES["llama_bf16_ckpt"]
    check_report(ckpt(kind, **kw), "auto", "bfloat16")


def check_report(model_dir, engine_dtype: str, effective_dtype: str) -> None:
    text, _ = text_config(model_dir)
    tensors = text_tensors(model_dir)
    size = DTYPE_BYTES[effective_dtype]
    with Engine(model_dir, dtype=engine_dtype, progress=False, max_total_tokens=TOKENS,
                max_running_requests=REQUESTS) as engine:
        reports = engine.stage_report()
    assert len(reports) == 1
    report = reports[0]
    assert (report["pp_rank"], report["tp_rank"]) == (0, 0)
    assert (report["layer_start"], report["layer_end"]) == (0, text["num_hidden_layers"])
    assert report["weight_bytes"] == sum(math.prod(shape) for shape, _ in tensors.values()) * size
    kv, state, slots = expected_cache_bytes(model_dir, size)
    assert (report["max_total_tokens"], report["page_size"], report["state_slots"]) == (TOKENS, 16, slots)
    assert report["kv_cache_bytes"] == kv
    assert report["state_cache_bytes"] == state
    assert sorted(report["tensors_read"]) == sorted(tensors)
    # read in the checkpoint's dtype
    assert report["bytes_read"] == sum(math.prod(shape) * DTYPE_BYTES[dt] for shape, dt in tensors.values())
