"""Defaults that do not alarm (issue #20 part 4): a KV pool sized from memory is capped at
max_running_requests x context_length tokens (and the log says so), and `tandem plan` exits 1 for a layout
that does not fit, naming the smallest pp x tp layouts that do, with the activation reserve in each stage's
total. Every expected figure is computed by hand from config.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tandem.cli import main as cli_main
from tandem.engine import Engine

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "default"


def test_bundled_model_pool_is_capped_at_requests_times_context(caplog):
    raw = json.loads((DEFAULT_MODEL / "config.json").read_text())
    full = raw["layer_types"].count("full_attention")
    # K and V of every full-attention layer, float32
    kv_per_token = 2 * full * raw["num_key_value_heads"] * raw["head_dim"] * 4
    caplog.set_level(logging.INFO, logger="tandem")
    with Engine(DEFAULT_MODEL, progress=False) as engine:
        report = engine.stage_report()[0]
    # the defaults: 256 running requests of the model's 128-token context, in pages of 16
    assert report["max_running_requests"] == 256 and report["context_length"] == raw["max_position_embeddings"] == 128
    assert report["max_total_tokens"] == 256 * 128 == 32768
    assert report["kv_cache_bytes"] == 32768 * kv_per_token == 32768 * 1024
    assert "KV cache: 32768 tokens (capped at max_running_requests 256 x context_length 128" in caplog.text


def test_cap_rounds_each_request_up_to_whole_pages(ckpt):
    # 3 requests of 40 tokens: 3 pages of 16 each
    with Engine(ckpt("llama"), dtype="float32", progress=False, max_running_requests=3, context_length=40) as engine:
        report = engine.stage_report()[0]
        assert report["max_total_tokens"] == 3 * 48
        out = engine.generate(input_ids=[[5, 6, 7]] * 3, sampling_params={"temperature": 0, "max_new_tokens": 4})
    assert [len(o["output_ids"]) for o in out] == [4, 4, 4]


def test_plan_of_the_bundled_model_is_capped_and_fits(capsys):
    assert cli_main(["plan", str(DEFAULT_MODEL), "--gpu-memory", "8GB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["fitting_layouts"] == []
    assert all(p["max_total_tokens"] == 256 * 128 for p in plan["plans"])


# ---- tandem plan: exit code and the layouts that fit -------------------------------------------------------

H, I, L, HEADS, KV_HEADS, HEAD_DIM, V = 64, 128, 4, 4, 2, 16, 1024
TOKENS, RESERVE = 1024, 1_000_000  # --max-total-tokens and --activation-reserve


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan_layouts")
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I,
        "num_hidden_layers": L, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "vocab_size": V, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "torch_dtype": "float32"}))
    return path


def stage_totals(pp: int, tp: int) -> list[int]:
    """Bytes per stage (uniform split, fp32): weights + KV of TOKENS tokens + the given activation reserve."""
    layer_weights = (H * (HEADS + 2 * KV_HEADS) * HEAD_DIM + HEADS * HEAD_DIM * H + 3 * H * I) // tp + 2 * H
    kv_per_layer = TOKENS * 2 * (KV_HEADS // tp) * HEAD_DIM * 4
    embedding = -(-V // tp) * H  # the LM head has as many rows
    totals = []
    counts = {1: [4], 2: [2, 2], 3: [1, 2, 1]}[pp]  # uniform: the remainder to the middle stages
    for stage, layers in enumerate(counts):
        params = layers * layer_weights + (embedding if stage == 0 else 0) + (embedding + H if stage == pp - 1 else 0)
        totals.append(params * 4 + layers * kv_per_layer + RESERVE)
    return totals


def plan(tiny_config, capsys, memory: int, pp: int = 1, tp: int = 1, json_out: bool = True):
    code = cli_main(["plan", str(tiny_config), "--pp-size", str(pp), "--tp-size", str(tp), "--gpu-memory",
                     f"{memory}B", "--max-total-tokens", str(TOKENS), "--max-running-requests", "4",
                     "--activation-reserve", f"{RESERVE}B"] + (["--json"] if json_out else []))
    out = capsys.readouterr().out
    return code, json.loads(out) if json_out else out


def test_plan_totals_include_the_activation_reserve(tiny_config, capsys):
    code, result = plan(tiny_config, capsys, 10**9, pp=2)
    assert code == 0 and result["fits"]
    uniform = result["plans"][0]
    assert uniform["partition"] == [2, 2]
    assert [s["total_bytes"] for s in uniform["stages"]] == stage_totals(2, 1) == [2_082_368, 2_082_624]


def test_plan_exits_1_and_names_the_smallest_layouts_that_fit(tiny_config, capsys):
    one = stage_totals(1, 1)[0]
    pp2, tp2 = max(stage_totals(2, 1)), max(stage_totals(1, 2))
    assert (one, pp2, tp2) == (3_164_992, 2_082_624, 2_083_648)
    # between pp=2 and tp=2: only pp=2 tp=1 of two devices fits
    code, result = plan(tiny_config, capsys, pp2 + 100)
    assert code == 1 and not result["fits"]
    assert [(x["pp_size"], x["tp_size"], x["partition_name"], x["partition"], x["max_total_tokens"])
            for x in result["fitting_layouts"]] == [(2, 1, "uniform", [2, 2], TOKENS)]
    # above both: both layouts of two devices, pp ascending
    code, result = plan(tiny_config, capsys, tp2)
    assert code == 1 and [(x["pp_size"], x["tp_size"]) for x in result["fitting_layouts"]] == [(1, 2), (2, 1)]
    code, text = plan(tiny_config, capsys, tp2, json_out=False)
    assert code == 1 and "pp=1 tp=1 does NOT fit" in text
    assert "The smallest layouts that fit: pp=1 tp=2 (uniform [4]: 1,024 KV tokens); pp=2 tp=1" in text
    # the suggested layout itself fits: exit 0
    assert plan(tiny_config, capsys, pp2, pp=2)[0] == 0
    # one byte short of both two-device layouts: three stages of [1, 2, 1] (tp=3 cannot shard 4 heads)
    assert max(stage_totals(3, 1)) < pp2 - 1
    code, result = plan(tiny_config, capsys, pp2 - 1)
    assert code == 1 and [(x["pp_size"], x["tp_size"], x["partition"]) for x in result["fitting_layouts"]] == \
        [(3, 1, [1, 2, 1])]
