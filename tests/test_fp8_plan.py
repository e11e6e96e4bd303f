"""`tandem plan` for block-wise FP8 checkpoints: the weight bytes of Qwen3.5-397B-A17B with the FP8 release's
quantization_config (128x128 blocks) against a hand count from config.json (1 byte per FP8 element, a float32
scale per block, bf16 for what stays unquantized), the same from `--dtype fp8` on the bf16 config, and the
stages of a pipeline summing to the whole."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tandem.cli import main as cli_main
from tandem.config import EngineArgs, EngineConfig, ModelConfig
from tandem.runtime.planning.resolve import resolve_partition
from tandem.runtime.planning.sizing import PoolSettings, plan_stages
from tandem.runtime.planning.stage_costs import costs_for, model_weight_bytes

CONFIG = Path(__file__).parent / "data" / "configs" / "Qwen3.5-397B-A17B" / "config.json"
BLOCK = 128
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": [BLOCK, BLOCK], "modules_to_not_convert": ["lm_head", "model.visual"]}


def fp8_bytes(out_features: int, in_features: int) -> int:
    return out_features * in_features + 4 * math.ceil(out_features / BLOCK) * math.ceil(in_features / BLOCK)


def hand_fp8_bytes(raw: dict) -> int:
    """Bytes of the text model of a Qwen3.5-MoE FP8 checkpoint, from config.json alone."""
    t = raw["text_config"]
    H, V = t["hidden_size"], t["vocab_size"]
    heads, kv, hd = t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]
    nk, nv = t["linear_num_key_heads"], t["linear_num_value_heads"]
    dk, dv, K = t["linear_key_head_dim"], t["linear_value_head_dim"], t["linear_conv_kernel_dim"]
    E, I, S = t["num_experts"], t["moe_intermediate_size"], t["shared_expert_intermediate_size"]
    bf16 = 2
    total = bf16 * (2 * V * H + H)  # embed_tokens, lm_head, model.norm (untied)
    full = (fp8_bytes(2 * heads * hd, H) + 2 * fp8_bytes(kv * hd, H) + fp8_bytes(H, heads * hd)
            + bf16 * 2 * hd)  # q (with the output gate), k, v, o; q_norm, k_norm
    conv = 2 * nk * dk + nv * dv
    linear = (fp8_bytes(conv, H) + fp8_bytes(nv * dv, H) + fp8_bytes(H, nv * dv)  # in_proj_qkv, in_proj_z, out_proj
              + bf16 * (2 * nv * H + conv * K + 2 * nv + dv))  # in_proj_b/a, conv1d, A_log, dt_bias, norm
    moe = (E * (2 * fp8_bytes(I, H) + fp8_bytes(H, I)) + 2 * fp8_bytes(S, H) + fp8_bytes(H, S)
           + bf16 * (E * H + H))  # experts, shared expert; router, shared_expert_gate
    for kind in t["layer_types"]:
        total += bf16 * 2 * H + moe + (linear if kind == "linear_attention" else full)
    return total


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory) -> Path:
    raw = json.loads(CONFIG.read_text())
    raw["quantization_config"] = FP8_CONFIG
    out = tmp_path_factory.mktemp("qwen3_5_397b_fp8")
    (out / "config.json").write_text(json.dumps(raw))
    return out


def test_fp8_checkpoint_plan_counts_one_byte_per_weight_plus_block_scales(fp8_dir):
    config = ModelConfig.from_hf(fp8_dir)
    costs = costs_for(EngineConfig.resolve(EngineArgs(model_path=str(fp8_dir), pp_size=2), config))
    expected = hand_fp8_bytes(json.loads((fp8_dir / "config.json").read_text()))
    assert model_weight_bytes(costs) == expected
    settings = PoolSettings(page_size=16, max_total_tokens=4096, max_running_requests=16,
                            slots_per_request=2, mem_fraction=0.88)
    counts = resolve_partition("auto", 2, costs.num_layers, lambda: costs, lambda: settings)
    assert sum(s.weight_bytes for s in plan_stages(costs, counts, settings)) == expected


def test_dtype_fp8_plans_a_bf16_config_as_its_fp8_release(fp8_dir, capsys):
    plans = []
    for argv in (["plan", str(CONFIG), "--dtype", "fp8"], ["plan", str(fp8_dir)]):
        # eight stages of 80 GB hold the FP8 weights (exit 0: the layout fits; it would exit 1 otherwise)
        assert cli_main(argv + ["--pp-size", "8", "--gpu-memory", "80GB", "--json"]) == 0
        plans.append(json.loads(capsys.readouterr().out))
    expected = hand_fp8_bytes(json.loads(CONFIG.read_text()))
    for plan in plans:
        assert plan["model_weight_bytes"] == expected
        assert plan["dtype"] == "bfloat16" and plan["quantization"] == "fp8 e4m3, blocks 128x128"
