"""`tandem plan --torchao-config`: the weight bytes of Qwen3.5-27B (dense hybrid) and Qwen3.5-35B-A3B (MoE
hybrid) under int8wo and int4wo-128 against a hand count from config.json (int8: 1 byte per element plus a
bf16 scale per output row; int4: half a byte per element plus a bf16 scale and zero per group of 128 inputs
and output row; only the `proj` linears but Gated DeltaNet's in_proj_a/b are quantized: embeddings, LM head,
norms, router, shared-expert gate and the stacked experts stay bf16), the bf16 count as the formula's check,
and a pipeline's stages summing to the whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandem.cli import main as cli_main
from tandem.config import EngineArgs, EngineConfig
from tandem.errors import ConfigError
from tandem.models.registry import load_model_config
from tandem.runtime.planning.stage_costs import costs_for, model_weight_bytes

CONFIGS = Path(__file__).parent / "data" / "configs"
BF16 = 2


def linear_bytes(spec: str):
    """Bytes of an [out, in] proj linear under `spec` ("" = bf16)."""
    def count(out_features: int, in_features: int) -> int:
        if spec == "int8wo":
            return out_features * in_features + BF16 * out_features
        if spec == "int4wo-128":
            return out_features * in_features // 2 + 2 * BF16 * out_features * (in_features // 128)
        return BF16 * out_features * in_features
    return count


def hand_bytes(raw: dict, spec: str) -> int:
    """The text model's weight bytes at one rank, pp1, from config.json alone."""
    lin = linear_bytes(spec)
    t = raw["text_config"]
    H, V = t["hidden_size"], t["vocab_size"]
    heads, kv, hd = t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]
    nk, nv = t["linear_num_key_heads"], t["linear_num_value_heads"]
    dk, dv, K = t["linear_key_head_dim"], t["linear_value_head_dim"], t["linear_conv_kernel_dim"]
    total = BF16 * (2 * V * H + H)  # embed_tokens, lm_head (untied), model.norm
    full = lin(2 * heads * hd, H) + 2 * lin(kv * hd, H) + lin(H, heads * hd) + BF16 * 2 * hd  # q+gate, k, v, o; norms
    conv = 2 * nk * dk + nv * dv
    linear = (lin(conv, H) + lin(nv * dv, H) + lin(H, nv * dv)  # in_proj_qkv, in_proj_z, out_proj
              + BF16 * (2 * nv * H + conv * K + 2 * nv + dv))  # in_proj_b/a, conv1d, A_log, dt_bias, norm
    if t.get("num_experts"):
        E, I, S = t["num_experts"], t["moe_intermediate_size"], t["shared_expert_intermediate_size"]
        mlp = (BF16 * E * 3 * I * H + 2 * lin(S, H) + lin(H, S)  # stacked experts (bf16), shared expert
               + BF16 * (E * H + H))  # router, shared_expert_gate
    else:
        I = t["intermediate_size"]
        mlp = 2 * lin(I, H) + lin(H, I)
    for kind in t["layer_types"]:
        total += BF16 * 2 * H + mlp + (linear if kind == "linear_attention" else full)
    return total


def plan_costs(name: str, spec: str, pp_size: int = 1):
    path = CONFIGS / name / "config.json"
    args = EngineArgs(model_path=str(path), pp_size=pp_size, torchao_config=spec)
    return costs_for(EngineConfig.resolve(args, load_model_config(str(path))))


@pytest.mark.parametrize("name", ["Qwen3.5-27B", "Qwen3.5-35B-A3B"])
@pytest.mark.parametrize("spec", ["", "int8wo", "int4wo-128"])
def test_weight_bytes_equal_the_hand_count(name, spec):
    raw = json.loads((CONFIGS / name / "config.json").read_text())
    assert model_weight_bytes(plan_costs(name, spec)) == hand_bytes(raw, spec)


def test_pp_stages_sum_to_the_whole(capsys):
    name = "Qwen3.5-27B"
    config = str(CONFIGS / name / "config.json")
    whole = {spec: model_weight_bytes(plan_costs(name, spec)) for spec in ("", "int8wo", "int4wo-128")}
    assert whole[""] > whole["int8wo"] > whole["int4wo-128"]
    assert cli_main(["plan", config, "--pp-size", "2", "--torchao-config", "int8wo", "--json"]) in (0, 1)
    plan = json.loads(capsys.readouterr().out)
    assert plan["torchao_config"] == "int8wo"
    for p in plan["plans"]:
        assert sum(s["weight_bytes"] for s in p["stages"]) == whole["int8wo"], p["name"]
    assert cli_main(["plan", config, "--torchao-config", "int4wo-128"]) in (0, 1)
    assert "torchao_config int4wo-128" in capsys.readouterr().out


def test_a_group_that_does_not_divide_a_shard_is_refused():
    # at tp 8 down_proj has 17408 / 8 = 2176 input features per rank: a multiple of 128, not of 256
    path = CONFIGS / "Qwen3.5-27B" / "config.json"
    for spec, ok in (("int4wo-128", True), ("int4wo-256", False)):
        args = EngineArgs(model_path=str(path), tp_size=8, torchao_config=spec)
        config = EngineConfig.resolve(args, load_model_config(str(path)))
        if ok:
            costs_for(config)
        else:
            with pytest.raises(ConfigError, match="down_proj has 2176 input features per rank"):
                costs_for(config)
