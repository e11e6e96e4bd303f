"""Time to first token of one long prompt with chunked prefill: pp=2 vs pp=1 (issue 12, second table row),
measured alternately in one run on the same machine. With chunked pipeline prefill, stage 0 computes chunk
i + 1 while stage 1 computes chunk i, so pp=2 should approach half of pp=1's time.

    .venv/bin/python bench/pp_prefill.py --model /tmp/tandem-bench-models/llama-dense [--prompt-len 2048]
        [--chunk 256] [--reps 3] [--out bench/results/pp_prefill_llama-dense.json]

The bench models are the ones bench/compare.py builds (bf16, random weights). One torch thread per process;
the radix cache is off so that every repetition prefills the whole prompt."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.bench import random_prompts
from tandem.engine import Engine


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "amx")))


def ttft(engine: Engine, prompt: list[int]) -> float:
    start = time.perf_counter()
    engine.generate(input_ids=[prompt], sampling_params={"temperature": 0, "max_new_tokens": 1, "ignore_eos": True})
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    common = dict(dtype="bfloat16", chunked_prefill_size=args.chunk, disable_radix_cache=True, progress=False,
                  max_total_tokens=4 * args.prompt_len, max_running_requests=4, context_length=args.prompt_len + 16)
    engines = {"pp1": Engine(args.model, **common), "pp2": Engine(args.model, pp_size=2, **common)}
    try:
        vocab = engines["pp1"].model_config.vocab_size
        prompt = random_prompts(1, args.prompt_len, vocab, seed=0)[0]
        times: dict[str, list[float]] = {name: [] for name in engines}
        for engine in engines.values():  # warm-up
            ttft(engine, prompt[: args.chunk])
        for _ in range(args.reps):
            for name, engine in engines.items():  # alternating, so load changes hit both alike
                times[name].append(ttft(engine, prompt))
    finally:
        for engine in engines.values():
            engine.shutdown()
    result = {
        "workload": f"one {args.prompt_len}-token prompt, chunked prefill {args.chunk}, 1 new token",
        "model": Path(args.model).name, "dtype": "bfloat16", "reps": args.reps,
        "machine": {"processor": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(),
                    "cpus": os.cpu_count()},
        "ttft_s": {name: {"median": statistics.median(v), "all": v} for name, v in times.items()},
    }
    result["pp2_over_pp1"] = result["ttft_s"]["pp2"]["median"] / result["ttft_s"]["pp1"]["median"]
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
