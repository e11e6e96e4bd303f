"""The measurement behind layers/weight_only.py's kernel choice: one [4864, 896] linear (a 0.5B model's MLP
shape), bf16 activations, one thread, per row count: Tandem's bf16 path (`matmul.linear`), torch's
`_weight_int8pack_mm`, the int8 float32 block path, and `_weight_int4pack_mm_for_cpu` (group 128). Best of
`--repeats` runs, taken alternately.

    .venv/bin/python bench/weight_only_kernels.py [--out bench/results/weight_only_kernels.json]"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.bench import machine_info
from tandem.layers import int8_kernel, weight_only
from tandem.layers.matmul import linear

N, K = 4864, 896
ROWS = (1, 2, 4, 6, 8, 12, 16, 32, 64)


def best_times(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: seconds * 1e6 for name, seconds in best.items()}


def products(x, w, int8, int4) -> dict:
    n, k = int8.out_features, int8.in_features
    plain = int8.int8_rows(0, n).contiguous()  # torch's kernel takes the [out, in] layout
    fns = {
        "bf16_path": lambda: linear(x, w),
        "int8_kernel": lambda: torch.ops.aten._weight_int8pack_mm(x, plain, int8.scales),
        "int8_block_path": lambda: weight_only._blockwise(x.float(), n, k, lambda s, r: plain[s:s + r].float()),
        "int4_kernel": lambda: int4(x),
    }
    if int8.packed:
        fns["int8_packed_kernel"] = lambda: int8_kernel.int8_packed_matmul(x.float(), int8.qweight, int8.scales32)
    return fns


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "weight_only_kernels.json"))
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    w = torch.randn(N, K).bfloat16()
    int8, int4 = weight_only.Int8WeightOnly(w), weight_only.Int4WeightOnly(w, 128)
    rows_out = []
    for rows in ROWS:
        fns = products(torch.randn(rows, K).bfloat16(), w, int8, int4)
        rows_out.append({"rows": rows, "us": best_times(fns, args.repeats)})
        print(rows, {name: round(us) for name, us in rows_out[-1]["us"].items()}, flush=True)
    result = {"shape": [N, K], "threads": 1, "machine": machine_info(), "loadavg": os.getloadavg(),
              "int8_kernel_max_rows": weight_only.INT8_KERNEL_MAX_ROWS, "rows": rows_out}
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
