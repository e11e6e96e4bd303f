"""Loading broken checkpoints fails with a clear error that names the problem: unknown architecture,
missing tensor, shape mismatch, no checkpoint files, unexpected tensors, invalid partitions. Each case edits
a copy of a good checkpoint in tmp_path (the good one is checked to load)."""

import json
import multiprocessing
import pathlib
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem.engine import Engine
from tandem.errors import CheckpointError, PartitionError, UnsupportedArchitectureError

INDEX = "model.safetensors.index.json"


def copy_checkpoint(src, tmp_path) -> pathlib.Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def edit_tensors(model_dir: pathlib.Path, edit, shard_of: str | None = None) -> None:
    """Apply edit(dict of tensors) to the file holding `shard_of` (or the single model.safetensors)."""
    index = model_dir / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        file = model_dir / weight_map[shard_of]
    else:
        file = model_dir / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def edit_config(model_dir: pathlib.Path, edit) -> None:
    raw = json.loads((model_dir / "config.json").read_text())
    edit(raw)
    (model_dir / "config.json").write_text(json.dumps(raw))


def load(model_dir, **kw):
    with Engine(model_dir, dtype="float32", progress=False, **kw) as engine:
        return engine.stage_report()


def names_in(message: str, name: str) -> bool:
    return re.search(rf"(^|[\s,(]){re.escape(name)}($|[\s,:)])", message) is not None


CASES = {  # name -> (kind, build kwargs)
    "llama": ("llama", {}),
    "qwen3_5_moe_mm": ("qwen3_5_moe", dict(multimodal=True, add_mtp=True)),
    "qwen3_5_moe_fused": ("qwen3_5_moe", dict(fused_experts=True)),
    "qwen3_5_tied": ("qwen3_5", dict(tied=True)),
    "qwen3_sharded": ("qwen3", dict(max_shard_size="60KB")),
}


def source(ckpt, case):
    kind, kw = CASES[case]
    return ckpt(kind, **kw)


@pytest.mark.parametrize("case", sorted(CASES))
def test_good_checkpoints_load(ckpt, case):
    report = load(source(ckpt, case))
    assert report[0]["layer_start"] == 0


# ---- architecture ------------------------------------------------------------------------------------------------

def test_unknown_architecture(ckpt, tmp_path):
    model_dir = copy_checkpoint(source(ckpt, "llama"), tmp_path)
    edit_config(model_dir, lambda raw: raw.update(architectures=["FancyNewForCausalLM"]))
    with pytest.raises(UnsupportedArchitectureError, match="FancyNewForCausalLM") as info:
        load(model_dir)
    assert "LlamaForCausalLM" in str(info.value), "the message lists what is supported"


# ---- missing tensors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, name", [
    ("llama", "model.layers.2.self_attn.k_proj.weight"),  # one piece of a fused parameter
    ("llama", "model.layers.0.mlp.up_proj.weight"),
    ("llama", "model.norm.weight"),
    ("llama", "lm_head.weight"),
    ("llama", "model.embed_tokens.weight"),
    ("qwen3_5_moe_mm", "model.language_model.layers.1.mlp.experts.5.up_proj.weight"),
    ("qwen3_5_moe_mm", "model.language_model.layers.0.linear_attn.A_log"),
    ("qwen3_5_moe_mm", "model.language_model.layers.2.linear_attn.conv1d.weight"),
    ("qwen3_5_moe_mm", "model.language_model.layers.3.self_attn.q_norm.weight"),
    ("qwen3_5_moe_mm", "model.language_model.layers.3.mlp.shared_expert_gate.weight"),
    ("qwen3_5_moe_fused", "model.layers.0.mlp.experts.gate_up_proj"),
    ("qwen3_5_moe_fused", "model.layers.2.mlp.experts.down_proj"),
    ("qwen3_5_tied", "model.embed_tokens.weight"),  # tied: the LM head needs it too
    ("qwen3_sharded", "model.layers.1.self_attn.q_norm.weight"),
])
def test_missing_tensor_is_named(ckpt, tmp_path, case, name):
    model_dir = copy_checkpoint(source(ckpt, case), tmp_path)
    edit_tensors(model_dir, lambda t: t.pop(name), shard_of=name)
    index = model_dir / INDEX
    if index.is_file():  # a consistent sharded checkpoint: the index no longer lists it either
        raw = json.loads(index.read_text())
        del raw["weight_map"][name]
        index.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="missing") as info:
        load(model_dir)
    assert names_in(str(info.value), name), str(info.value)


def test_index_lists_a_tensor_its_shard_lacks(ckpt, tmp_path):
    name = "model.layers.1.mlp.down_proj.weight"
    model_dir = copy_checkpoint(source(ckpt, "qwen3_sharded"), tmp_path)
    edit_tensors(model_dir, lambda t: t.pop(name), shard_of=name)
    with pytest.raises(CheckpointError) as info:
        load(model_dir)
    assert names_in(str(info.value), name), str(info.value)


def test_index_names_a_missing_shard_file(ckpt, tmp_path):
    model_dir = copy_checkpoint(source(ckpt, "qwen3_sharded"), tmp_path)
    weight_map = json.loads((model_dir / INDEX).read_text())["weight_map"]
    victim = weight_map["model.layers.2.mlp.up_proj.weight"]
    (model_dir / victim).unlink()
    with pytest.raises(CheckpointError, match=re.escape(victim)):
        load(model_dir)


# ---- shape mismatches -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, name, change", [
    ("llama", "model.layers.1.mlp.down_proj.weight", lambda t: t.t().contiguous()),
    ("llama", "model.layers.0.self_attn.v_proj.weight", lambda t: t[:-16].contiguous()),
    ("llama", "model.layers.3.self_attn.q_proj.weight", lambda t: torch.cat([t, t[:1]])),
    ("llama", "model.embed_tokens.weight", lambda t: t[:-1].contiguous()),
    ("llama", "lm_head.weight", lambda t: t[:, :-1].contiguous()),
    ("llama", "model.layers.2.post_attention_layernorm.weight", lambda t: t[:-1].contiguous()),
    ("qwen3_5_moe_mm", "model.language_model.layers.0.mlp.experts.3.down_proj.weight", lambda t: t[:, :-1].contiguous()),
    ("qwen3_5_moe_mm", "model.language_model.layers.1.linear_attn.in_proj_qkv.weight", lambda t: t[:-2].contiguous()),
    ("qwen3_5_moe_mm", "model.language_model.layers.1.linear_attn.dt_bias", lambda t: torch.cat([t, t])),
    ("qwen3_5_moe_fused", "model.layers.1.mlp.experts.gate_up_proj", lambda t: t[:-1].contiguous()),
    ("qwen3_5_moe_fused", "model.layers.1.mlp.experts.down_proj", lambda t: t[:, :, :-1].contiguous()),
])
def test_shape_mismatch_is_named(ckpt, tmp_path, case, name, change):
    model_dir = copy_checkpoint(source(ckpt, case), tmp_path)
    edit_tensors(model_dir, lambda t: t.__setitem__(name, change(t[name])), shard_of=name)
    with pytest.raises(CheckpointError, match="shape") as info:
        load(model_dir)
    assert names_in(str(info.value), name), str(info.value)


# ---- unexpected tensors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, name, shape", [
    ("llama", "model.layers.0.self_attn.extra_proj.weight", (4, 4)),
    ("llama", "model.something_else.weight", (4,)),
    ("llama", "model.layers.0.self_attn.o_proj.bias", (64,)),  # a bias the model does not have
    ("llama", "model.layers.9.mlp.up_proj.weight", (96, 64)),  # a layer the model does not have
    ("llama", "mtp.fc.weight", (64, 128)),  # MTP weights are only ignorable for families that declare them
    ("qwen3_5_moe_mm", "model.language_model.layers.0.mlp.experts.8.up_proj.weight", (32, 64)),  # expert 8 of 8
    ("qwen3_5_moe_mm", "model.language_model.extra.weight", (4,)),
])
def test_unexpected_tensor_is_named(ckpt, tmp_path, case, name, shape):
    model_dir = copy_checkpoint(source(ckpt, case), tmp_path)
    edit_tensors(model_dir, lambda t: t.__setitem__(name, torch.zeros(shape)))
    with pytest.raises(CheckpointError) as info:
        load(model_dir)
    assert names_in(str(info.value), name), str(info.value)


def test_ignorable_tensors_load(ckpt):
    """The multimodal+MTP checkpoint really has vision and MTP tensors, and they are not read."""
    from support.checkpoints import checkpoint_tensor_names

    model_dir = source(ckpt, "qwen3_5_moe_mm")
    names = checkpoint_tensor_names(model_dir)
    assert any(n.startswith("mtp.") for n in names) and any(n.startswith("model.visual.") for n in names)
    read = load(model_dir)[0]["tensors_read"]
    assert not any(n.startswith(("mtp.", "model.visual.")) for n in read)


# ---- no checkpoint -------------------------------------------------------------------------------------------

def test_config_without_weights(ckpt, tmp_path):
    model_dir = tmp_path / "only-config"
    model_dir.mkdir()
    shutil.copy(source(ckpt, "llama") / "config.json", model_dir)
    with pytest.raises(CheckpointError, match="no safetensors checkpoint"):
        load(model_dir)


def test_empty_and_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path / "nowhere")


def test_several_files_without_index(ckpt, tmp_path):
    model_dir = copy_checkpoint(source(ckpt, "qwen3_sharded"), tmp_path)
    (model_dir / INDEX).unlink()
    with pytest.raises(CheckpointError, match="without an index"):
        load(model_dir)


# ---- partitions ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, pattern", [
    (dict(pp_size=5), r"pp_size 5 exceeds the model's 4 layers"),
    (dict(pp_size=8), r"pp_size 8 exceeds"),
    (dict(pp_size=2, pp_layer_partition="1,2"), r"sums to 3 .*4 layers"),
    (dict(pp_size=2, pp_layer_partition="4,0"), r"at least one layer"),
    (dict(pp_size=2, pp_layer_partition="1,1,2"), r"3 entries but pp_size is 2"),
    (dict(pp_size=2, pp_layer_partition="2.5,1.5"), r"not an integer"),
    (dict(pp_size=2, pp_layer_partition=[1.5, 2.5]), r"not an integer"),
    (dict(pp_layer_partition="3"), r"sums to 3"),
])
def test_invalid_partition_fails_before_starting_ranks(ckpt, kw, pattern):
    before = set(multiprocessing.active_children())
    with pytest.raises(PartitionError, match=pattern):
        load(source(ckpt, "llama"), **kw)
    assert set(multiprocessing.active_children()) <= before, "no rank process may be started"
