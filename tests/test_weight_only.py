"""Weight-only int8 / int4 (`torchao_config`): the flag's values, the quantized matmuls against weights
dequantized by hand, float32 engines against an unquantized engine run on a checkpoint holding those
dequantized weights, bf16 engines against the bf16 run (logprobs of the same tokens within a stated
tolerance), pp2 against pp1, and stage_report weight bytes computed from the checkpoint headers.

Tolerances: the tiny random test models have wide logit ranges (prompt tokens at -15 to -20 nats), so bf16
alone moves logprobs by up to ~0.15 nats from float32 (and the bf16 run's decode from its own prefill by
~0.1). A quantized bf16 run is held to BF16_NOISE times the bf16 run's distance from float32, measured on the
same model, against a float32 run of its own dequantized weights; int8wo against the bf16 run is within
INT8_TOL (measured: 0.27 llama, 0.64 qwen3_5). int4wo against the bf16 run is not bounded here: on random Gaussian weights
int4 at group 32 moves these logprobs by 2-4 nats (bench/results/weight_only_*.json has the bench models)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from support.checkpoints import checkpoint_tensor_names
from tandem.cli import main
from tandem.config import EngineArgs, WeightOnlySpec
from tandem.engine import Engine
from tandem.errors import ConfigError
from tandem.layers.weight_only import INT8_KERNEL_MAX_ROWS, Int4WeightOnly, Int8WeightOnly

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [17, 5, 250, 3]]
NEW = 8
BF16_NOISE = 3  # a quantized bf16 run may be this many times as far from its exact weights as bf16 is from fp32
INT8_TOL = 1.0  # nats: int8wo vs the bf16 run, the logprobs of the bf16 run's own prompt and greedy tokens
# checkpoint tensors that become int8 / int4 (the stacked MoE experts, router, GDN in_proj_a/b do not)
QUANTIZED = re.compile(r"layers\.(\d+)\.(self_attn|linear_attn|mlp|mlp\.shared_expert)\."
                       r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|in_proj_qkv|in_proj_z|out_proj)"
                       r"\.weight$")


def test_flag_values():
    assert WeightOnlySpec.parse("") is None and WeightOnlySpec.parse(None) is None
    assert WeightOnlySpec.parse("int8wo") == WeightOnlySpec("int8wo", 8)
    assert WeightOnlySpec.parse("int4wo-128") == WeightOnlySpec("int4wo-128", 4, 128)
    for bad in ("int4wo", "int4wo-48", "int4wo-x", "int8dq", "fp8wo", "int8wo-32", "INT8WO", 8):
        with pytest.raises(ConfigError):
            WeightOnlySpec.parse(bad)
    with pytest.raises(ConfigError, match="int4wo-48"):
        EngineArgs(model_path="m", torchao_config="int4wo-48")
    with pytest.raises(ConfigError, match="cpu"):
        EngineArgs(model_path="m", device="cuda", torchao_config="int8wo")


def int8_by_hand(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, dequantized float32 weight): symmetric per row, the scale rounded to w's dtype first."""
    scale = (w.float().abs().amax(1) / 127).to(w.dtype).float()
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127)
    return q.to(torch.int8), q * scale[:, None]


def int4_by_hand(w: torch.Tensor, group: int) -> torch.Tensor:
    """The dequantized float32 weight of torchao's int4 format: (q - 8) * scale + zero per group, the scale
    and zero rounded to bf16 first."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6).bfloat16().float()
    zero = (lo + 8 * scale).bfloat16().float()
    q = torch.round((g - (zero - 8 * scale)[..., None]) / scale[..., None]).clamp(0, 15)
    return ((q - 8) * scale[..., None] + zero[..., None]).reshape(n, k)


@pytest.mark.parametrize("out_features", [320, 318, 323])  # 318, 323: not a multiple of torch's 4-channel blocks
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, INT8_KERNEL_MAX_ROWS, INT8_KERNEL_MAX_ROWS + 1, 40])
def test_int8_matmul_against_hand_dequantized(dtype, rows, out_features):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(out_features, 192, generator=gen).to(dtype)
    x = torch.randn(rows, 192, generator=gen).to(dtype)
    bias = torch.randn(out_features, generator=gen).to(dtype)
    module = Int8WeightOnly(w)
    q, w_hat = int8_by_hand(w)
    assert torch.equal(module.int8_rows(0, out_features), q) and module.qweight.dtype == torch.int8
    ref = F.linear(x.float(), w_hat) + bias.float()
    out = module(x, bias)
    assert out.dtype == dtype and out.shape == (rows, out_features)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_int8_decode_rows_of_any_output_size_run_in_a_process_that_survives():
    """torch 2.13's `_weight_int8pack_mm` crashes (SIGSEGV) on these shapes: out % 4 in (2, 3); run in a
    child process so that a crash is a failure, not the end of the test session."""
    code = (
        "import torch\n"
        "from tandem.layers.weight_only import Int8WeightOnly\n"
        "for n in (6, 1026, 1027):\n"
        "    w = torch.randn(n, 1000, generator=torch.Generator().manual_seed(n)).bfloat16()\n"
        "    m = Int8WeightOnly(w)\n"
        "    x = torch.randn(1, 1000).bfloat16()\n"
        "    ref = x.float() @ m.dequantize().T\n"
        "    out = m(x).float()\n"
        "    assert (out - ref).abs().max() <= 2e-2 * ref.abs().max(), n\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("rows", [1, 16])
def test_int4_matmul_against_hand_dequantized(group, rows):
    gen = torch.Generator().manual_seed(group + rows)
    w = torch.randn(96, 256, generator=gen).bfloat16()
    x = torch.randn(2, rows, 256, generator=gen).bfloat16()
    module = Int4WeightOnly(w, group)
    ref = F.linear(x.float(), int4_by_hand(w, group))
    out = module(x)
    assert out.shape == (2, rows, 96) and module.qweight.numel() == 96 * 256 // 2
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def quantized_bytes(shape, spec: str) -> int:
    n, k = shape
    if spec == "int8wo":
        return n * k + 2 * n  # int8 values, one bf16 scale per output row
    group = int(spec.split("-")[1])
    return n * k // 2 + (k // group) * n * 2 * 2  # two per byte, a bf16 scale and zero per group and row


def expected_weight_bytes(model_dir, spec: str, layers: range, first: bool, last: bool) -> int:
    """A bf16 stage's weight bytes from the checkpoint headers: quantized linears in their packed sizes."""
    total = 0
    for name, (shape, _) in checkpoint_tensor_names(model_dir).items():
        layer = re.search(r"layers\.(\d+)\.", name)
        if layer:
            if int(layer.group(1)) not in layers:
                continue
        elif not ((first and "embed_tokens" in name) or (last and name in ("lm_head.weight", "model.norm.weight"))):
            continue
        total += quantized_bytes(shape, spec) if QUANTIZED.search(name) else math.prod(shape) * 2
    return total


def run(model_dir, prompts, **kwargs) -> tuple[list[dict], list[dict]]:
    with Engine(model_dir, progress=False, max_total_tokens=512, **kwargs) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": NEW},
                               return_logprob=True, logprob_start_len=0)
        return outs, engine.stage_report()


def scored(outs) -> list[list[float]]:
    """Each request's logprobs of its prompt (after the first token) and its output tokens."""
    return [[lp for lp, _ in o["meta_info"]["input_token_logprobs"] + o["meta_info"]["output_token_logprobs"]]
            for o in outs]


def rescore(model_dir, base_outs, **kwargs) -> list[list[float]]:
    """Logprobs, under the engine of `kwargs`, of the prompts followed by the baseline's outputs."""
    texts = [p + o["output_ids"] for p, o in zip(PROMPTS, base_outs)]
    with Engine(model_dir, progress=False, max_total_tokens=512, **kwargs) as engine:
        outs = engine.generate(input_ids=texts, sampling_params={"temperature": 0, "max_new_tokens": 1},
                               return_logprob=True, logprob_start_len=0)
    return [[lp for lp, _ in o["meta_info"]["input_token_logprobs"]] for o in outs]


def dequantized(w: torch.Tensor, spec: str) -> torch.Tensor:
    return int8_by_hand(w)[1] if spec == "int8wo" else int4_by_hand(w, int(spec.split("-")[1]))


def dequantized_checkpoint(model_dir, out_dir, spec: str):
    """A float32 copy of model_dir whose quantized linears hold their values dequantized by hand."""
    out_dir.mkdir()
    for f in model_dir.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            save_file({n: dequantized(t, spec) if QUANTIZED.search(n) else t.float() for n, t in tensors.items()},
                      out_dir / f.name, metadata={"format": "pt"})
        elif f.is_file():
            (out_dir / f.name).write_bytes(f.read_bytes())
    return out_dir


@pytest.mark.parametrize("kind", ["llama", "qwen3_5", "qwen3_5_moe"])
def test_float32_int8wo_equals_dequantized_checkpoint(ckpt, tmp_path, kind):
    model_dir = ckpt(kind)
    ref_outs, _ = run(dequantized_checkpoint(model_dir, tmp_path / "deq", "int8wo"), PROMPTS)
    outs, _ = run(model_dir, PROMPTS, torchao_config="int8wo")
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in ref_outs]
    for want, have in zip(scored(ref_outs), scored(outs)):
        assert have == pytest.approx(want, abs=1e-4)


def max_diff(want: list[list[float]], have: list[list[float]]) -> float:
    assert [len(w) for w in want] == [len(h) for h in have]
    return max(abs(a - b) for w, h in zip(want, have) for a, b in zip(w, h))


@pytest.mark.parametrize("kind", ["llama", "qwen3_5"])
def test_bf16_quantized_near_its_exact_weights_and_the_bf16_run(ckpt, tmp_path, kind):
    """bf16 int8wo / int4wo-32 engines against float32 runs of their dequantized weights: within BF16_NOISE
    times the plain bf16 run's own distance from float32; int8wo against the bf16 run: within INT8_TOL; and
    stage_report weight_bytes from the checkpoint headers."""
    model_dir = ckpt(kind, dtype="bfloat16")
    fp32, report = run(model_dir, PROMPTS, dtype="float32")
    noise = max_diff(scored(fp32), rescore(model_dir, fp32, dtype="bfloat16"))
    layers = range(report[0]["layer_start"], report[0]["layer_end"])
    for spec in ("int8wo", "int4wo-32"):
        exact, _ = run(dequantized_checkpoint(model_dir, tmp_path / spec, spec), PROMPTS, dtype="float32")
        assert max_diff(scored(exact), rescore(model_dir, exact, torchao_config=spec)) <= BF16_NOISE * noise, spec
        _, report = run(model_dir, PROMPTS[:1], torchao_config=spec)
        assert report[0]["weight_bytes"] == expected_weight_bytes(model_dir, spec, layers, True, True)
    bf16, _ = run(model_dir, PROMPTS)
    assert max_diff(scored(bf16), rescore(model_dir, bf16, torchao_config="int8wo")) < INT8_TOL


@pytest.mark.parametrize("spec", ["int8wo", pytest.param("int4wo-32", marks=pytest.mark.slow)])
def test_pp2_equals_pp1_and_bytes_per_stage(ckpt, spec):
    model_dir = ckpt("qwen3_5", dtype="bfloat16")
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    one, _ = run(model_dir, PROMPTS, torchao_config=spec)
    two, reports = run(model_dir, PROMPTS, torchao_config=spec, pp_size=2)
    assert [o["output_ids"] for o in two] == [o["output_ids"] for o in one]
    assert scored(two) == scored(one)  # the same arithmetic on each stage: bit-identical
    half = layers // 2
    for r in reports:
        first, last = r["pp_rank"] == 0, r["pp_rank"] == 1
        assert (r["layer_start"], r["layer_end"]) == ((0, half) if first else (half, layers))
        assert r["weight_bytes"] == expected_weight_bytes(model_dir, spec, range(r["layer_start"], r["layer_end"]),
                                                          first, last)


def test_int4_group_must_divide_the_tp_shard(ckpt):
    # llama's down_proj has 96 input features: 48 per rank at tp2, not a multiple of 32
    with pytest.raises(Exception, match="down_proj has 48 input features per rank"):
        run(ckpt("llama", dtype="bfloat16"), PROMPTS[:1], torchao_config="int4wo-32", tp_size=2, max_rank_restarts=0)


def test_eval_of_bundled_model_greedy_equal(capsys):
    """`tandem eval` of the bundled model (float32, Qwen3.5-MoE, pp1): the int8wo and int4wo-32 runs' greedy
    answers equal the unquantized run's on 20 held-out problems."""
    model = str(Path(__file__).resolve().parents[1] / "models" / "default")
    outputs = []
    for flags in ((), ("--torchao-config", "int8wo"), ("--torchao-config", "int4wo-32")):
        assert main(["eval", "--model-path", model, "--configs", "pp1", "--limit", "20", "--json", *flags]) == 0
        outputs.append([o["output_ids"] for o in json.loads(capsys.readouterr().out)["configs"][0]["outputs"]])
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]
