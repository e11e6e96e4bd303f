"""Block-wise FP8 weights on CPU: one product `linear(x, W)` with W [out, in] stored as FP8 (128x128 blocks,
dequantized a block of rows at a time, `tandem/layers/fp8.py`) against the same weight in bf16 and fp32
(`tandem/layers/matmul.py`'s paths), side by side in one process, one torch thread, for decode- and
prefill-sized inputs. Each figure is the best of alternating runs (the minimum is what other processes' load
distorts least); the ratios are what to compare across machines.

    .venv/bin/python bench/fp8_linear.py [--json bench/results/fp8_linear.json]"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.layers.fp8_layout import quantize_module
from tandem.layers.linear import ColumnParallelLinear
from tandem.layers.matmul import linear
from tandem.parallel.layout import GroupInfo

BLOCK = (128, 128)
SHAPES = [(2048, 2048), (512, 2048)]  # a hidden-size projection; an expert's gate/up of a 2048-wide model
ROWS = [1, 16, 256]


def fp8_layer(weight: torch.Tensor) -> ColumnParallelLinear:
    """A layer holding `weight` block-quantized to FP8 (amax / 448 per block)."""
    out_f, in_f = weight.shape
    layer = ColumnParallelLinear(GroupInfo.alone(), in_f, out_f)
    quantize_module(layer, BLOCK)
    blocks = weight.view(out_f // BLOCK[0], BLOCK[0], in_f // BLOCK[1], BLOCK[1])
    scale = blocks.abs().amax(dim=(1, 3)) / 448.0
    values = (blocks / scale[:, None, :, None]).reshape(out_f, in_f).to(torch.float8_e4m3fn)
    layer.weight.weight_loader(layer.weight, values, None)
    layer.weight_scale_inv.weight_loader(layer.weight_scale_inv, scale, None)
    return layer


def best_of(fns: dict, repeats: int) -> dict[str, float]:
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()  # warm-up (oneDNN builds its kernels on first use)
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    results = []
    for out_f, in_f in SHAPES:
        weight = torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5
        layer, w_bf16 = fp8_layer(weight), weight.bfloat16()
        for rows in ROWS:
            x = torch.randn(rows, in_f, generator=gen)
            xb = x.bfloat16()
            best = best_of({"fp8": lambda xb=xb, w=layer.weight: linear(xb, w),
                            "bf16": lambda xb=xb, w=w_bf16: linear(xb, w),
                            "fp32": lambda x=x, w=weight: linear(x, w)}, args.repeats)
            row = {"out": out_f, "in": in_f, "rows": rows, **{f"{k}_us": v * 1e6 for k, v in best.items()},
                   "fp8_over_bf16": best["fp8"] / best["bf16"], "fp8_over_fp32": best["fp8"] / best["fp32"]}
            results.append(row)
            print(f"[{out_f}x{in_f}] rows {rows:4d}: fp8 {row['fp8_us']:9.0f} us  bf16 {row['bf16_us']:9.0f} us  "
                  f"fp32 {row['fp32_us']:9.0f} us  fp8/bf16 {row['fp8_over_bf16']:.2f}")
    machine = {"cpu": platform.processor() or platform.machine(), "load_average": os.getloadavg(),
               "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "block": BLOCK, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
