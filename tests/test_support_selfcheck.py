"""Sanity checks of the test-support code (tests/support): checkpoints build, load back with transformers,
have the advertised tensor layouts, and give non-degenerate greedy outputs."""

from __future__ import annotations

import json

import pytest
import torch

from support.checkpoints import HYBRID_KINDS, KINDS, MOE_KINDS, build_checkpoint, checkpoint_tensor_names
from support.reference import hf_greedy, hf_greedy_generate, hf_score, load_hf_model
from support.tokenizer import EOS_TOKEN_ID, IM_START_ID, PAD_TOKEN_ID

PROMPTS = [[17, 200, 45, 99, 3], [250, 8, 8, 131, 77, 64, 12, 5, 190]]
PROBE = [5, 71, 213, 9, 140, 33, 260, 88, 17, 4, 199, 58]


@pytest.mark.parametrize("kind", KINDS)
def test_kind_builds_loads_and_is_not_degenerate(ckpt, kind):
    d = ckpt(kind)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and cfg["hidden_size"] == 64 and cfg["vocab_size"] >= 300
    assert cfg["eos_token_id"] == EOS_TOKEN_ID
    names = checkpoint_tensor_names(d)
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    assert all(dt == "float32" for _, dt in names.values())

    res = hf_greedy(d, PROMPTS, 8)
    outs = [r["output_ids"] for r in res]
    for r in res:
        assert len(r["output_ids"]) == len(r["logprobs"]) == 8
        assert len(set(r["output_ids"])) > 2, r["output_ids"]
        assert all(lp <= 0.0 for lp in r["logprobs"])
    assert outs[0] != outs[1]
    # logprobs agree with full-sequence scoring
    s = hf_score(d, PROMPTS[0] + outs[0])
    forced = s[len(PROMPTS[0]) - 1 : -1].gather(1, torch.tensor(outs[0])[:, None]).squeeze(1)
    torch.testing.assert_close(forced, torch.tensor(res[0]["logprobs"]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen3_5"])
def test_greedy_matches_hf_generate(ckpt, kind):
    d = ckpt(kind)
    assert hf_greedy_generate(d, PROMPTS[1], 8) == hf_greedy(d, [PROMPTS[1]], 8)[0]["output_ids"]


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen3_5"])
def test_tied(ckpt, kind):
    d = ckpt(kind, tied=True)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    assert "lm_head.weight" not in checkpoint_tensor_names(d)
    model = load_hf_model(d)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    outs = [r["output_ids"] for r in hf_greedy(d, PROMPTS, 8)]
    assert outs[0] != outs[1] and all(len(set(o)) > 2 for o in outs)


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_moe_layouts(ckpt, kind):
    per_expert = checkpoint_tensor_names(ckpt(kind))
    fused = checkpoint_tensor_names(ckpt(kind, fused_experts=True))
    cfg = json.loads((ckpt(kind) / "config.json").read_text())
    E, I, H = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["hidden_size"]
    p = "model.layers.0.mlp."
    assert per_expert[p + "experts.0.gate_proj.weight"][0] == (I, H)
    assert per_expert[p + f"experts.{E - 1}.down_proj.weight"][0] == (H, I)
    assert not any(k.endswith("experts.gate_up_proj") for k in per_expert)
    assert fused[p + "experts.gate_up_proj"][0] == (E, 2 * I, H)
    assert fused[p + "experts.down_proj"][0] == (E, H, I)
    assert not any(".experts.0." in k for k in fused)
    assert per_expert[p + "gate.weight"][0] == (E, H)
    has_shared = kind in ("qwen2_moe", "qwen3_5_moe")
    assert (p + "shared_expert_gate.weight" in per_expert) == has_shared
    assert (p + "shared_expert.gate_proj.weight" in fused) == has_shared
    # Same weights in both layouts -> identical HF outputs.
    torch.testing.assert_close(hf_score(ckpt(kind), PROBE), hf_score(ckpt(kind, fused_experts=True), PROBE),
                               atol=1e-6, rtol=0)


def test_norm_topk_prob_both_ways(ckpt):
    assert json.loads((ckpt("qwen2_moe") / "config.json").read_text())["norm_topk_prob"] is False
    assert json.loads((ckpt("qwen3_moe") / "config.json").read_text())["norm_topk_prob"] is True


@pytest.mark.parametrize("kind", HYBRID_KINDS)
def test_multimodal_and_mtp(ckpt, kind):
    d = ckpt(kind, multimodal=True, add_mtp=True, fused_experts=kind in MOE_KINDS)
    cfg = json.loads((d / "config.json").read_text())
    assert "text_config" in cfg and "vision_config" in cfg
    assert cfg["text_config"]["mtp_num_hidden_layers"] == 1
    names = checkpoint_tensor_names(d)
    assert "model.language_model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert any(k.startswith("model.visual.") for k in names)
    assert "mtp.fc.weight" in names and "mtp.norm.weight" in names
    assert not any(k.startswith("model.layers.") for k in names)
    model = load_hf_model(d)
    assert type(model).__name__.endswith("ForConditionalGeneration")
    # Text weights are seeded by canonical name: same outputs as the text-only checkpoint.
    torch.testing.assert_close(hf_score(d, PROBE), hf_score(ckpt(kind), PROBE), atol=1e-5, rtol=0)


def test_qwen3_5_config_and_tensors(ckpt):
    d = ckpt("qwen3_5")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert cfg["linear_num_key_heads"] < cfg["linear_num_value_heads"]
    assert cfg["rope_parameters"]["partial_rotary_factor"] == 0.25
    names = checkpoint_tensor_names(d)
    for n in ("A_log", "dt_bias", "conv1d.weight", "in_proj_qkv.weight", "in_proj_z.weight", "in_proj_a.weight",
              "in_proj_b.weight", "norm.weight", "out_proj.weight"):
        assert f"model.layers.0.linear_attn.{n}" in names
    assert names["model.layers.3.self_attn.q_proj.weight"][0] == (2 * 4 * 32, 64)  # query + output gate
    assert "model.layers.3.self_attn.q_norm.weight" in names


def test_irregular_layer_types(ckpt):
    lt = ["full_attention", "linear_attention", "full_attention", "linear_attention", "linear_attention"]
    d = ckpt("qwen3_5_moe", layer_types=lt)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["layer_types"] == lt and cfg["num_hidden_layers"] == 5
    names = checkpoint_tensor_names(d)
    for i, t in enumerate(lt):
        assert (f"model.layers.{i}.self_attn.q_proj.weight" in names) == (t == "full_attention")
        assert (f"model.layers.{i}.linear_attn.A_log" in names) == (t == "linear_attention")
    res = hf_greedy(d, PROMPTS[:1], 6)
    assert len(set(res[0]["output_ids"])) > 2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtypes(ckpt, dtype):
    d = ckpt("qwen3", dtype=dtype)
    assert {dt for _, dt in checkpoint_tensor_names(d).values()} == {dtype}
    assert json.loads((d / "config.json").read_text())["dtype"] == dtype
    s = hf_score(d, PROBE)
    assert s.dtype == torch.float32 and torch.isfinite(s).all()
    # Upcast weights: close to (but not exactly) the fp32 checkpoint.
    assert (s - hf_score(ckpt("qwen3"), PROBE)).abs().max() < 0.5


def test_sharded_with_mtp(tmp_path):
    d = build_checkpoint("qwen3_5_moe", tmp_path / "s", max_shard_size="100KB", add_mtp=True)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((d / f).exists() for f in files)
    names = checkpoint_tensor_names(d)
    assert set(index["weight_map"]) == set(names)
    assert any(k.startswith("mtp.layers.0.mlp.experts.0.") for k in names)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["mtp_num_hidden_layers"] == 1
    # mtp.* tensors are ignored by HF; same outputs as an unsharded checkpoint without mtp.
    ref = build_checkpoint("qwen3_5_moe", tmp_path / "u")
    assert set(checkpoint_tensor_names(ref)) == {k for k in names if not k.startswith("mtp.")}
    torch.testing.assert_close(hf_score(d, PROBE), hf_score(ref, PROBE), atol=0, rtol=0)


def test_tokenizer(ckpt):
    from transformers import AutoTokenizer

    d = ckpt("qwen2", with_tokenizer=True)
    tok = AutoTokenizer.from_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    assert len(tok) <= cfg["vocab_size"]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == cfg["eos_token_id"] == EOS_TOKEN_ID
    assert tok.pad_token_id == PAD_TOKEN_ID and tok.convert_tokens_to_ids("<|im_start|>") == IM_START_ID
    text = "The cat sees 12+34=46 today."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text)  # some merges were learned
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    s = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert s == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    chat_ids = tok(s, add_special_tokens=False)["input_ids"]
    assert chat_ids[0] == IM_START_ID and chat_ids.count(EOS_TOKEN_ID) == 2
    # the chat ids drive the model: our greedy loop and HF's generate continue them alike, within the vocabulary
    continuation = hf_greedy(d, [chat_ids], 4)[0]["output_ids"]
    assert continuation == hf_greedy_generate(d, chat_ids, 4)
    assert len(continuation) == 4 and all(0 <= t < cfg["vocab_size"] for t in continuation)


def test_ckpt_fixture_caches(ckpt):
    assert ckpt("llama") == ckpt("llama")
    assert ckpt("qwen3_5", layer_types=["full_attention"]) == ckpt("qwen3_5", layer_types=("full_attention",))
    assert ckpt("llama") != ckpt("llama", seed=1)
