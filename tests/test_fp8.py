"""Block-wise FP8 checkpoints (quantization_config quant_method fp8), against independent references.

Checkpoints: FP8 copies (tests/support/fp8_checkpoints.py) of random multimodal Qwen3.5-MoE with an MTP head
(experts per expert, as in the Qwen3.5 FP8 releases), Qwen3.5 dense with tied embeddings (bf16 scales, one
layer's down_proj in modules_to_not_convert) and Llama, with block sizes that give several blocks and partial
edge blocks, and TP shards that cut blocks.
- Layers: a rank's dequantized FP8 weight equals, bit for bit, the same rank's shard of the dequantized
  checkpoint tensor loaded by the layer's own (unquantized) loader, for every parallel layer kind and TP cuts.
- Engine at pp1, pp2, pp3 and tp2: greedy tokens equal transformers (float32) run on the dequantized weights,
  logprobs within 1e-4; weight_bytes per stage equal the owned tensors' bytes from the safetensors headers
  (1 per FP8 element, 4 per float32 scale, 4 per other element); a stage reads its own scales, no others'."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch

from support.checkpoints import checkpoint_tensor_names
from support.fp8_checkpoints import dequantize_blocks, dequantized_checkpoint, quantize_blocks, quantize_checkpoint
from support.reference import hf_greedy
from tandem.config import EngineArgs, EngineConfig
from tandem.engine import Engine
from tandem.errors import CheckpointError, ConfigError
from tandem.layers import matmul
from tandem.layers.fp8 import dequantize_rows, expert_weight
from tandem.layers.fp8_layout import quantize_module
from tandem.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from tandem.layers.matmul import linear
from tandem.layers.moe import StackedExperts
from tandem.models.registry import load_model_config
from tandem.parallel.layout import GroupInfo
from tandem.quantization import Fp8Config
from tandem.runtime.planning.decode_timing import time_decode_parts
from tandem.runtime.planning.stage_costs import build_stage_on_meta

TOL = 1e-4
PROMPTS = [[3, 17, 92, 5], list(range(40, 77)), [250, 9, 8, 7, 6, 5, 4, 3, 2, 1, 12]]
MAX_NEW = 6
SAMPLING = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}
LAYER = re.compile(r"\.layers\.(\d+)\.")

MODELS = {  # name: (kind, build kwargs, block, scale dtype, modules_to_not_convert extras)
    "qwen3_5_moe": ("qwen3_5_moe", {"multimodal": True, "add_mtp": True}, (20, 24), torch.float32, ()),
    "qwen3_5_tied": ("qwen3_5", {"tied": True}, (24, 40), torch.bfloat16, ("model.layers.1.mlp.down_proj",)),
    "llama": ("llama", {}, (16, 48), torch.float32, ()),
}
_built: dict[str, tuple] = {}
_reference: dict[str, list[dict]] = {}


@pytest.fixture
def fp8_model(ckpt, tmp_path_factory):
    """fp8_model(name) -> (FP8 checkpoint dir, dequantized float32 checkpoint dir), built once per session."""

    def get(name: str):
        if name not in _built:
            kind, kwargs, block, scale_dtype, skip = MODELS[name]
            fp8 = quantize_checkpoint(ckpt(kind, **kwargs), tmp_path_factory.mktemp(f"fp8-{name}"), block,
                                      scale_dtype, skip)
            _built[name] = fp8, dequantized_checkpoint(fp8, tmp_path_factory.mktemp(f"fp8-ref-{name}"))
        return _built[name]

    return get


def reference(name: str, ref_dir) -> list[dict]:
    if name not in _reference:
        _reference[name] = hf_greedy(ref_dir, PROMPTS, MAX_NEW)
    return _reference[name]


def assert_matches(outs: list[dict], refs: list[dict]) -> None:
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert out["output_ids"] == ref["output_ids"], f"prompt {i}: greedy tokens differ"
        lps = [lp for lp, _ in out["meta_info"]["output_token_logprobs"]]
        worst = max(abs(a - b) for a, b in zip(lps, ref["logprobs"]))
        assert worst <= TOL, f"prompt {i}: logprob differs by {worst:.2e}"


def owned_bytes(fp8_dir, start: int, end: int, first: bool, last: bool, tied: bool) -> int:
    """A float32 stage's weight bytes from the checkpoint headers: 1 byte per FP8 element, 4 per scale (kept in
    float32 whatever the checkpoint stores) and per other element."""
    total = 0
    for name, (shape, dtype) in text_tensors(fp8_dir).items():
        name = name.replace("model.language_model.", "model.", 1)
        layer = LAYER.search(name)
        if layer:
            owned = start <= int(layer.group(1)) < end
        elif name.startswith("model.embed_tokens."):
            owned = first or (tied and last)
        else:
            owned = last  # model.norm, lm_head
        if owned:
            total += math.prod(shape) * (1 if dtype == "float8_e4m3fn" else 4)
    return total


def text_tensors(fp8_dir) -> dict:
    """The checkpoint's tensors of the text model (the MTP head and the vision tower are never read)."""
    return {name: info for name, info in checkpoint_tensor_names(fp8_dir).items()
            if not name.startswith(("mtp.", "model.visual."))}


def check_stages(report: list[dict], fp8_dir, tied: bool) -> None:
    scales = {n for n in text_tensors(fp8_dir) if n.endswith("_scale_inv")}
    ignored_scales = {n for n in checkpoint_tensor_names(fp8_dir) if n.endswith("_scale_inv")} - scales
    pp = report[-1]["pp_rank"] + 1
    for stage in report:
        start, end = stage["layer_start"], stage["layer_end"]
        first, last = stage["pp_rank"] == 0, stage["pp_rank"] == pp - 1
        assert stage["weight_bytes"] == owned_bytes(fp8_dir, start, end, first, last, tied)
        own = {n for n in scales if start <= int(LAYER.search(n).group(1)) < end}
        assert own and own <= set(stage["tensors_read"])  # its own weights' scales ...
        assert not (scales - own) & set(stage["tensors_read"])  # ... and no other stage's
        assert not ignored_scales & set(stage["tensors_read"])  # nor the MTP head's


@pytest.mark.parametrize("name", list(MODELS))
def test_single_process_matches_transformers_on_dequantized_weights(fp8_model, name):
    fp8_dir, ref_dir = fp8_model(name)
    with Engine(fp8_dir, dtype="float32", progress=False) as engine:
        outs = engine.generate(input_ids=PROMPTS, sampling_params=SAMPLING, return_logprob=True)
        report = engine.stage_report()
        dtypes = {p.dtype for p in engine.executor.runner.model.parameters()}
    assert torch.float8_e4m3fn in dtypes
    assert_matches(outs, reference(name, ref_dir))
    check_stages(report, fp8_dir, MODELS[name][1].get("tied", False))


# tp2 of the MoE model cuts blocks of q/k/v, in_proj_qkv, in_proj_z, out_proj and the experts; Llama's tp2 (the
# same layer kinds as the full-attention layers here, covered exactly by the layer tests below) is a slow extra
PARALLEL = [pytest.param("qwen3_5_moe", 1, 3, id="qwen3_5_moe-pp3"), pytest.param("qwen3_5_tied", 1, 2, id="tied-pp2"),
            pytest.param("qwen3_5_moe", 2, 1, id="qwen3_5_moe-tp2"),
            pytest.param("llama", 2, 1, id="llama-tp2", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,tp,pp", PARALLEL)
def test_parallel_matches_transformers_on_dequantized_weights(fp8_model, name, tp, pp):
    fp8_dir, ref_dir = fp8_model(name)
    with Engine(fp8_dir, tp_size=tp, pp_size=pp, dtype="float32", progress=False) as engine:
        outs = engine.generate(input_ids=PROMPTS, sampling_params=SAMPLING, return_logprob=True)
        report = engine.stage_report()
    assert_matches(outs, reference(name, ref_dir))
    if tp == 1:
        check_stages(report, fp8_dir, MODELS[name][1].get("tied", False))


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(MODELS))
def test_cuda_matches_transformers_on_dequantized_weights(fp8_model, name):
    """The CUDA path (FP8 weights on the GPU, dequantized a block of rows at a time in the activations' dtype);
    float32 products may run in TF32 there, hence test_cuda.py's tolerance."""
    assert torch.cuda.is_available(), "needs a CUDA GPU (run with -m cuda on a GPU machine)"
    fp8_dir, ref_dir = fp8_model(name)
    with Engine(fp8_dir, dtype="float32", device="cuda", progress=False) as engine:
        outs = engine.generate(input_ids=PROMPTS, sampling_params=SAMPLING, return_logprob=True)
    refs = reference(name, ref_dir)
    for out, ref in zip(outs, refs):
        assert out["output_ids"] == ref["output_ids"]
        lps = [lp for lp, _ in out["meta_info"]["output_token_logprobs"]]
        assert max(abs(a - b) for a, b in zip(lps, ref["logprobs"])) <= 2e-3


# ---- layers: a rank's FP8 weight, dequantized, is exactly its shard of the dequantized checkpoint tensor -------

def _pieces(shapes: dict, block, seed: int) -> dict:
    """shard id -> (fp8, scale, dequantized) of a random checkpoint tensor of that shape."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for shard, shape in shapes.items():
        fp8, scale = quantize_blocks(torch.randn(shape, generator=gen), block, torch.float32)
        out[shard] = fp8, scale, dequantize_blocks(fp8, scale, block)
    return out


def _load_both(make, shapes: dict, block, names=("weight",), seed: int = 0):
    """(FP8 module, float32 module), both loaded through their own loaders from the same checkpoint tensors."""
    fp8_module, float_module = make(), make()
    pieces = shapes[names[0]]
    quantize_module(fp8_module, block, fused=list(pieces) == [None] and len(fp8_module.weight.shard_ids) > 1)
    for name in names:
        for shard, (fp8, scale, dense) in _pieces(shapes[name], block, seed).items():
            param, scale_param = getattr(fp8_module, name), getattr(fp8_module, f"{name}_scale_inv")
            param.weight_loader(param, fp8, shard)
            scale_param.weight_loader(scale_param, scale, shard)
            getattr(float_module, name).weight_loader(getattr(float_module, name), dense, shard)
        seed += 1
    return fp8_module, float_module


def _dense(weight: torch.Tensor) -> torch.Tensor:
    return dequantize_rows(weight, 0, weight.shape[0], torch.float32)


TP_LAYERS = {  # name: (module factory for GroupInfo tp, checkpoint shapes per shard id, block)
    "merged_gate_up_tp3": (lambda tp: MergedColumnParallelLinear(tp, 64, [96, 96]), {0: (96, 64), 1: (96, 64)},
                           (20, 24)),
    "merged_fused_qkv_tp2": (lambda tp: MergedColumnParallelLinear(tp, 64, [32, 32, 64]), {None: (128, 64)},
                             (24, 40)),
    "qkv_replicated_kv_tp4": (lambda tp: QKVParallelLinear(tp, 64, 16, 4, 2),
                              {"q": (64, 64), "k": (32, 64), "v": (32, 64)}, (24, 40)),
    "column_tp2": (lambda tp: ColumnParallelLinear(tp, 64, 48), {None: (48, 64)}, (20, 24)),
    # the plain grid (scales broadcast over whole blocks), with a partial last row block
    "column_grid_tp1": (lambda tp: ColumnParallelLinear(tp, 64, 50), {None: (50, 64)}, (16, 16)),
    "row_tp3": (lambda tp: RowParallelLinear(tp, 96, 64), {None: (64, 96)}, (24, 40)),
}
TP_SIZE = {"merged_gate_up_tp3": 3, "merged_fused_qkv_tp2": 2, "qkv_replicated_kv_tp4": 4, "column_tp2": 2,
           "row_tp3": 3, "column_grid_tp1": 1}


@pytest.mark.parametrize("name", list(TP_LAYERS))
def test_tp_shards_cutting_blocks_dequantize_exactly(name):
    make, shapes, block = TP_LAYERS[name]
    x = torch.randn(5, 96 if name == "row_tp3" else 64, generator=torch.Generator().manual_seed(9))
    x = x[:, :32] if name == "row_tp3" else x
    for rank in range(TP_SIZE[name]):
        tp = GroupInfo(rank, TP_SIZE[name])
        fp8_module, float_module = _load_both(lambda tp=tp: make(tp), {"weight": shapes}, block)
        assert fp8_module.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(_dense(fp8_module.weight), float_module.weight)
        assert torch.allclose(linear(x, fp8_module.weight), linear(x, float_module.weight), atol=1e-5, rtol=0)


def test_expert_stacks_dequantize_exactly_per_expert():
    block, experts = (16, 24), 3
    shapes = {"gate_up_proj": {(e, j): (40, 64) for e in range(experts) for j in (0, 1)},
              "down_proj": {e: (64, 40) for e in range(experts)}}
    for rank in range(2):
        fp8_module, float_module = _load_both(lambda rank=rank: StackedExperts(GroupInfo(rank, 2), experts, 64, 40),
                                              shapes, block, names=("gate_up_proj", "down_proj"))
        for name in ("gate_up_proj", "down_proj"):
            for e in range(experts):
                assert torch.equal(_dense(expert_weight(getattr(fp8_module, name), e)),
                                   getattr(float_module, name)[e])


def test_every_finite_fp8_code_dequantizes_exactly():
    layer = ColumnParallelLinear(GroupInfo.alone(), 32, 8)
    quantize_module(layer, (8, 32))
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(8, 32)
    finite = torch.where(codes.float().isnan(), torch.zeros((), dtype=torch.float8_e4m3fn), codes)
    scale = torch.tensor([[3.0]])
    layer.weight.weight_loader(layer.weight, finite, None)
    layer.weight_scale_inv.weight_loader(layer.weight_scale_inv, scale, None)
    assert layer.weight.block_scale.grid == (8, 32)
    assert torch.equal(_dense(layer.weight), finite.float() * 3.0)
    with pytest.raises(CheckpointError, match="NaN"):
        layer.weight.weight_loader(layer.weight, codes, None)


def test_a_high_precision_tensor_or_a_misshapen_scale_for_an_fp8_module_is_refused():
    tp = GroupInfo.alone()
    layer = ColumnParallelLinear(tp, 64, 48)
    quantize_module(layer, (20, 24))
    with pytest.raises(CheckpointError, match="modules_to_not_convert"):
        layer.weight.weight_loader(layer.weight, torch.randn(48, 64), None)
    with pytest.raises(CheckpointError, match="20x24 blocks"):
        layer.weight_scale_inv.weight_loader(layer.weight_scale_inv, torch.ones(2, 3), None)


# ---- quantization_config --------------------------------------------------------------------------------------

GOOD = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 64],
        "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.down_proj"]}


@pytest.mark.parametrize("change,message", [
    ({"quant_method": "awq"}, "quant_method 'awq'"), ({"fmt": "e5m2"}, "fmt 'e5m2'"),
    ({"activation_scheme": "static"}, "activation_scheme 'static'"), ({"weight_block_size": None}, "per-tensor"),
    ({"weight_block_size": [128]}, "two positive integers"), ({"ignored_layers": []}, "ignored_layers"),
])
def test_unsupported_quantization_settings_are_refused(change, message):
    raw = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        Fp8Config.from_dict(raw)


def test_which_modules_are_fp8():
    quant = Fp8Config.from_dict(GOOD)
    assert quant.weight_block_size == (128, 64)
    assert quant.quantized_module("model.layers.1.mlp.down_proj")
    assert quant.quantized_module("model.language_model.layers.3.mlp.experts.7.gate_proj")
    assert not quant.quantized_module("model.layers.0.mlp.down_proj")
    assert not quant.quantized_module("model.layers.10.mlp.gate")  # the router, always high precision
    assert quant.quantized_module("model.layers.10.mlp.gate_proj")
    assert not quant.quantized_module("model.layers.2.linear_attn.in_proj_b")


def test_the_latency_probe_times_fp8_layers(fp8_model, monkeypatch):
    fp8_dir, _ = fp8_model("qwen3_5_moe")
    shapes = []
    real = matmul.fp8_linear
    monkeypatch.setattr(matmul, "fp8_linear", lambda x, w, b=None: shapes.append(tuple(w.shape)) or real(x, w, b))
    config = load_model_config(fp8_dir)
    args = EngineArgs(model_path=str(fp8_dir), dtype="float32", max_running_requests=2, context_length=16)
    timing = time_decode_parts(EngineConfig.resolve(args, config), reps=1)
    assert len(timing.layer_seconds) == config.num_layers
    expert = (2 * config.moe_intermediate_size, config.hidden_size)
    assert expert in shapes and (config.hidden_size, config.num_heads * config.head_dim) in shapes  # experts, o_proj


def test_a_fused_layer_of_fp8_and_unquantized_pieces_is_refused(fp8_model):
    config = load_model_config(fp8_model("llama")[0])
    skip_q = dataclasses.replace(config.quantization, modules_to_not_convert=("model.layers.2.self_attn.q_proj",))
    with pytest.raises(ConfigError, match=r"layers\.2\.self_attn\.k_proj.* \(FP8\) and model\.layers\.2\.self_attn\.q_proj"):
        build_stage_on_meta(dataclasses.replace(config, quantization=skip_q), torch.float32, 1)


def test_fp8_tensors_without_quantization_config_are_refused_naming_the_cause(fp8_model, tmp_path):
    fp8_dir, _ = fp8_model("llama")
    for file in fp8_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="weight_scale_inv.*no quantization_config"):
        Engine(tmp_path, dtype="float32", progress=False)
