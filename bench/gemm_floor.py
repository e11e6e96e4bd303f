"""How far Tandem pp=1 can get ahead of transformers `generate` on this CPU: the share of each one's time
spent in matrix products, from torch.profiler, on the workload of bench/compare.py (16 prompts x 32 tokens,
64 new tokens, bf16, one torch thread): wall times unprofiled (median of alternating runs), GEMM time from one
profiled run of each.

    .venv/bin/python bench/gemm_floor.py [--json bench/results/gemm_floor.json]

Both run the same products on the same weights (the same torch GEMM kernels), so Tandem's time can never
fall below its own GEMM time: transformers' total / Tandem's GEMM time bounds the speedup any amount of
work outside the GEMMs could bring."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import VOCAB, bench_transformers, build_models

from tandem.bench import random_prompts
from tandem.engine import Engine
from tandem.runtime.sampling.params import SamplingParams
from tandem.runtime.scheduling.scheduler import Request

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm")


def gemm_seconds(run) -> float:
    """Self CPU seconds of the GEMM ops inside run(), from torch.profiler (whose per-op overhead inflates the
    small ops around them, not the long products themselves)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS) / 1e6


def wall_seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(path: Path, num_prompts: int, input_len: int, output_len: int, reps: int) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    prompts = random_prompts(num_prompts, input_len, VOCAB, seed=1)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    engine = Engine(str(path), dtype="bfloat16", progress=False, log_level="warning")
    params = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)

    def tandem():
        engine.run_requests([Request(list(p), params) for p in prompts])

    def transformers():
        bench_transformers(hf, prompts, output_len)

    runs = {"transformers": transformers, "tandem pp1": tandem}
    walls: dict[str, list[float]] = {label: [] for label in runs}
    try:
        tandem(), transformers()  # warm-up
        for _ in range(reps):  # unprofiled, alternating: the wall times
            for label, run in runs.items():
                walls[label].append(wall_seconds(run))
        out = {label: {"seconds": statistics.median(walls[label]), "gemm_seconds": gemm_seconds(run)}
               for label, run in runs.items()}
    finally:
        engine.shutdown()
    tokens = num_prompts * output_len
    for label, row in out.items():
        row["tokens_per_s"] = tokens / row["seconds"]
        row["gemm_share"] = row["gemm_seconds"] / row["seconds"]
        row["wall_runs"] = walls[label]
    out["speedup"] = out["transformers"]["seconds"] / out["tandem pp1"]["seconds"]
    out["speedup_bound"] = out["transformers"]["seconds"] / out["tandem pp1"]["gemm_seconds"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="/tmp/tandem-bench-models")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = {}
    for name, path in build_models(Path(args.models)).items():
        results[name] = measure(path, args.num_prompts, args.input_len, args.output_len, args.reps)
        r = results[name]
        print(f"{name}: transformers {r['transformers']['seconds']:.2f} s (GEMM {r['transformers']['gemm_share']:.0%}), "
              f"Tandem pp1 {r['tandem pp1']['seconds']:.2f} s (GEMM {r['tandem pp1']['gemm_share']:.0%}); "
              f"speedup {r['speedup']:.2f}x, bound with zero non-GEMM time {r['speedup_bound']:.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
