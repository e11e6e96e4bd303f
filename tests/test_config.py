"""ModelConfig.from_hf (text_config nesting of multimodal checkpoints, defaults of omitted keys), the family
flags each model class declares (`block_spec`), the registry's architecture check, and EngineArgs
validation. Expected values are read from config.json directly, not through transformers."""

import json
import pathlib

import pytest
import torch

from tandem.config import EngineArgs, EngineConfig, ModelConfig, parse_dtype
from tandem.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from tandem.models.registry import get_model_class, load_model_config

REAL_CONFIGS = pathlib.Path(__file__).parent / "data" / "configs"


def copy_config(model_dir, tmp_path, edit=None) -> pathlib.Path:
    """A directory holding only an (edited) copy of model_dir's config.json."""
    out = tmp_path / "cfg"
    out.mkdir()
    raw = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    if edit is not None:
        edit(raw)
    (out / "config.json").write_text(json.dumps(raw))
    return out


def spec_of(cfg: ModelConfig):
    """The block flags the config's family declares."""
    return get_model_class(cfg.architecture).block_spec(cfg)


def default_pattern(num_layers: int, interval: int) -> tuple[str, ...]:
    return tuple("full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers))


@pytest.mark.parametrize("kind", ["qwen3_5", "qwen3_5_moe"])
def test_multimodal_text_config_nesting(ckpt, kind):
    model_dir = ckpt(kind, multimodal=True, add_mtp=True)
    raw = json.loads((model_dir / "config.json").read_text())
    text = raw["text_config"]
    cfg = ModelConfig.from_hf(model_dir)
    assert cfg.multimodal is True
    assert cfg.weight_prefix == "model.language_model."
    assert cfg.architecture == raw["architectures"][0]
    assert cfg.architecture.endswith("ForConditionalGeneration")
    # the text model's shape, not the vision tower's (whose hidden_size/num_heads differ)
    assert raw["vision_config"]["hidden_size"] != text["hidden_size"]
    assert cfg.hidden_size == text["hidden_size"]
    assert cfg.num_heads == text["num_attention_heads"]
    assert cfg.num_kv_heads == text["num_key_value_heads"]
    assert cfg.head_dim == text["head_dim"]
    assert cfg.num_layers == text["num_hidden_layers"]
    assert cfg.vocab_size == text["vocab_size"]
    assert cfg.layer_types == tuple(text["layer_types"])
    assert cfg.partial_rotary_factor == text["rope_parameters"]["partial_rotary_factor"]
    assert cfg.linear_num_key_heads == text["linear_num_key_heads"]
    assert cfg.linear_num_value_heads == text["linear_num_value_heads"]
    assert cfg.linear_conv_kernel_dim == text["linear_conv_kernel_dim"]
    assert spec_of(cfg).qk_norm and spec_of(cfg).attn_output_gate
    assert cfg.mtp_num_hidden_layers == 1
    assert cfg.eos_token_ids == (text["eos_token_id"],)
    assert cfg.tie_word_embeddings is False
    assert cfg.checkpoint_dtype == torch.float32
    if kind == "qwen3_5_moe":
        assert cfg.num_experts == text["num_experts"] and cfg.is_moe
        assert cfg.num_experts_per_tok == text["num_experts_per_tok"]
        assert cfg.moe_intermediate_size == text["moe_intermediate_size"]
        assert cfg.shared_expert_intermediate_size == text["shared_expert_intermediate_size"]
        assert cfg.moe_layers == (True,) * cfg.num_layers
        assert spec_of(cfg).norm_topk_prob is True
    else:
        assert not cfg.is_moe and cfg.intermediate_size == text["intermediate_size"]


@pytest.mark.parametrize("kind", ["qwen3_5", "qwen3_5_moe"])
def test_text_only_qwen3_5_has_model_prefix(ckpt, kind):
    cfg = ModelConfig.from_hf(ckpt(kind))
    assert cfg.multimodal is False and cfg.weight_prefix == "model."
    assert cfg.mtp_num_hidden_layers == 0
    assert cfg.layer_types == default_pattern(cfg.num_layers, 4)


@pytest.mark.parametrize("multimodal", [True, False])
@pytest.mark.parametrize("interval, num_layers", [(2, 6), (3, 6), (None, 8)])
def test_omitted_layer_types_come_from_full_attention_interval(ckpt, tmp_path, multimodal, interval, num_layers):
    def edit(raw):
        text = raw["text_config"] if multimodal else raw
        del text["layer_types"]
        text.pop("full_attention_interval", None)
        if interval is not None:
            text["full_attention_interval"] = interval
        text["num_hidden_layers"] = num_layers

    cfg = ModelConfig.from_hf(copy_config(ckpt("qwen3_5", multimodal=multimodal), tmp_path, edit))
    assert cfg.num_layers == num_layers
    assert cfg.layer_types == default_pattern(num_layers, interval or 4)


def test_omitted_mtp_keys_default_to_no_mtp(ckpt, tmp_path):
    def edit(raw):
        for key in [k for k in raw["text_config"] if k.startswith("mtp")]:
            del raw["text_config"][key]

    cfg = ModelConfig.from_hf(copy_config(ckpt("qwen3_5_moe", multimodal=True, add_mtp=True), tmp_path, edit))
    assert cfg.mtp_num_hidden_layers == 0


def test_layer_types_length_mismatch_is_an_error(ckpt, tmp_path):
    def edit(raw):
        raw["layer_types"] = raw["layer_types"][:-1]

    with pytest.raises(ConfigError, match=r"layer_types|num_hidden_layers"):
        ModelConfig.from_hf(copy_config(ckpt("qwen3_5"), tmp_path, edit))


@pytest.mark.parametrize("kind, expected", [
    ("llama", {"qkv_bias": False, "o_bias": False, "qk_norm": False, "attn_output_gate": False, "num_experts": 0}),
    ("qwen2", {"qkv_bias": True, "o_bias": False, "qk_norm": False, "attn_output_gate": False, "num_experts": 0}),
    ("qwen3", {"qkv_bias": False, "qk_norm": True, "attn_output_gate": False, "head_dim": 32, "num_experts": 0}),
    ("qwen2_moe", {"qkv_bias": True, "qk_norm": False, "num_experts": 8, "norm_topk_prob": False,
                   "shared_expert_intermediate_size": 48}),
    ("qwen3_moe", {"qkv_bias": False, "qk_norm": True, "num_experts": 8, "norm_topk_prob": True,
                   "shared_expert_intermediate_size": 0}),
])
def test_text_families(ckpt, kind, expected):
    model_dir = ckpt(kind)
    raw = json.loads((model_dir / "config.json").read_text())
    cfg = ModelConfig.from_hf(model_dir)
    assert cfg.architecture == raw["architectures"][0]
    assert cfg.weight_prefix == "model." and not cfg.multimodal
    assert cfg.layer_types == ("full_attention",) * raw["num_hidden_layers"]
    assert cfg.head_dim == (raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"])
    assert cfg.rope_parameters["rope_theta"] == raw["rope_parameters"]["rope_theta"]
    assert cfg.partial_rotary_factor == 1.0
    spec = spec_of(cfg)
    for key, value in expected.items():
        assert getattr(spec if hasattr(spec, key) else cfg, key) == value, key
    if cfg.num_experts:
        assert cfg.moe_layers == (True,) * cfg.num_layers


def test_moe_layers_follow_sparse_step_and_mlp_only_layers(ckpt, tmp_path):
    def edit(raw):
        raw["decoder_sparse_step"] = 2
        raw["mlp_only_layers"] = [3]

    cfg = ModelConfig.from_hf(copy_config(ckpt("qwen2_moe"), tmp_path, edit))
    assert cfg.moe_layers == (False, True, False, False)


def test_bf16_checkpoint_dtype(ckpt):
    cfg = ModelConfig.from_hf(ckpt("llama", dtype="bfloat16"))
    assert cfg.checkpoint_dtype == torch.bfloat16
    assert EngineConfig.resolve(EngineArgs(model_path="x"), cfg).dtype == torch.bfloat16
    assert EngineConfig.resolve(EngineArgs(model_path="x", dtype="float32"), cfg).dtype == torch.float32


@pytest.mark.parametrize("name", sorted(p.name for p in REAL_CONFIGS.iterdir()) if REAL_CONFIGS.is_dir() else [])
def test_real_configs(name):
    raw = json.loads((REAL_CONFIGS / name / "config.json").read_text())
    text = raw.get("text_config", raw)
    cfg = ModelConfig.from_hf(REAL_CONFIGS / name)
    assert cfg.multimodal == ("text_config" in raw)
    assert cfg.weight_prefix == ("model.language_model." if cfg.multimodal else "model.")
    assert cfg.num_layers == text["num_hidden_layers"]
    assert cfg.layer_types == tuple(text.get("layer_types") or ["full_attention"] * cfg.num_layers)
    assert cfg.hidden_size == text["hidden_size"] and cfg.vocab_size == text["vocab_size"]
    assert cfg.head_dim == text["head_dim"]
    assert cfg.num_experts == text.get("num_experts", 0)
    assert cfg.mtp_num_hidden_layers == text.get("mtp_num_hidden_layers", 0)
    assert cfg.checkpoint_dtype == torch.bfloat16


# ---- errors --------------------------------------------------------------------------------------------------

def test_no_config_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        ModelConfig.from_hf(tmp_path / "does-not-exist")


def test_no_architectures_is_a_config_error(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="architectures"):
        ModelConfig.from_hf(copy_config(ckpt("llama"), tmp_path, lambda raw: raw.pop("architectures")))


def test_unknown_architecture(ckpt, tmp_path):
    def edit(raw):
        raw["architectures"] = ["MysteryForCausalLM"]

    with pytest.raises(UnsupportedArchitectureError, match="MysteryForCausalLM"):
        load_model_config(copy_config(ckpt("llama"), tmp_path, edit))


@pytest.mark.parametrize("field, value", [
    ("tp_size", 0), ("pp_size", -1), ("pp_size", 1.5), ("tp_size", True), ("max_running_requests", 0),
    ("chunked_prefill_size", 0), ("dtype", "float8"), ("device", "tpu"), ("node_rank", 1),
])
def test_engine_args_validation(field, value):
    with pytest.raises(ConfigError, match=field.split("_")[0]):
        EngineArgs(model_path="x", **{field: value})


def test_dtype_aliases():
    assert parse_dtype("bf16") == torch.bfloat16 and parse_dtype("fp32") == torch.float32
    with pytest.raises(ConfigError, match="unknown dtype"):
        parse_dtype("int8")
