"""Block-wise FP8 copies of the tiny random checkpoints (the format of DeepSeek's / Qwen's FP8 releases), and
the float32 checkpoint of their dequantized weights that transformers runs as the reference.

    quantize_checkpoint(src, out, block=(24, 40))      # -> out: FP8 checkpoint (two shards + index)
    dequantized_checkpoint(out, ref)                  # -> ref: float32, weight = fp8 x scale per block

Written independently of tandem: the rule of which tensors are quantized is the FP8 releases' (every linear
projection of the decoder layers; embeddings, LM head, norms, the MoE router and shared-expert gate, Gated
DeltaNet's in_proj_a / in_proj_b, conv1d, A_log and dt_bias stay high precision), and the unquantized tensors
are stored in bfloat16 as those releases do."""

from __future__ import annotations

import json
import math
import pathlib
import re
import shutil

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
PROJECTIONS = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|in_proj_qkv|in_proj_z|"
                         r"out_proj)\.weight$")
KEPT_HIGH = re.compile(r"\.(mlp\.gate|mlp\.shared_expert_gate|linear_attn\.in_proj_a|linear_attn\.in_proj_b)\.weight$")
INDEX = "model.safetensors.index.json"


def read_tensors(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    model_dir = pathlib.Path(model_dir)
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype):
    """(fp8 [out, in], scale [ceil(out/B0), ceil(in/B1)]) with weight ~ fp8 x scale of its block."""
    b0, b1 = block
    out_f, in_f = weight.shape
    rows, cols = math.ceil(out_f / b0), math.ceil(in_f / b1)
    padded = torch.zeros(rows * b0, cols * b1, dtype=torch.float32)
    padded[:out_f, :in_f] = weight.float()
    blocks = padded.view(rows, b0, cols, b1)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-8)
    scale = (amax / FP8_MAX).to(scale_dtype)
    values = (blocks / scale.float()[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    return values.view(rows * b0, cols * b1)[:out_f, :in_f].to(FP8).contiguous(), scale.contiguous()


def dequantize_blocks(fp8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    b0, b1 = block
    full = scale.float().repeat_interleave(b0, dim=0).repeat_interleave(b1, dim=1)
    return fp8.float() * full[:fp8.shape[0], :fp8.shape[1]]


def quantize_checkpoint(src, out, block: tuple[int, int], scale_dtype: torch.dtype = torch.float32,
                        not_converted: tuple[str, ...] = ()) -> pathlib.Path:
    """An FP8 copy of the checkpoint `src` in `out`. not_converted: extra module names (e.g. one layer's
    down_proj) left in bfloat16 and listed in modules_to_not_convert."""
    from safetensors.torch import save_file

    src, out = pathlib.Path(src), pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors, skipped = {}, set(not_converted)
    for name, tensor in read_tensors(src).items():
        module = name.removesuffix(".weight")
        if KEPT_HIGH.search(name):
            skipped.add(module)
        if PROJECTIONS.search(name) and tensor.dim() == 2 and module not in skipped and ".visual." not in f".{name}":
            tensors[name], tensors[name + "_scale_inv"] = quantize_blocks(tensor, block, scale_dtype)
        else:
            tensors[name] = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(out / file), metadata={"format": "pt"})
    weight_map = {n: file for file, part in halves.items() for n in part}
    (out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block), "modules_to_not_convert": sorted(skipped)}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for extra in src.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in ("config.json", INDEX):
            shutil.copy(extra, out / extra.name)
    return out


def dequantized_checkpoint(fp8_dir, out) -> pathlib.Path:
    """The float32 checkpoint of an FP8 checkpoint's weights (fp8 x scale per block; the rest upcast)."""
    from safetensors.torch import save_file

    fp8_dir, out = pathlib.Path(fp8_dir), pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((fp8_dir / "config.json").read_text())
    block = tuple(config.pop("quantization_config")["weight_block_size"])
    config["dtype"] = "float32"
    tensors = read_tensors(fp8_dir)
    dense = {}
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        dense[name] = dequantize_blocks(tensor, scale, block) if scale is not None else tensor.float()
    save_file(dense, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
