"""Where a decode step's time goes, Tandem bf16 vs int8wo vs int4wo-128, batch 1, one thread: torch.profiler
op self-times of the decode steps only (the ops after the prefill's last 32-row op), per step, grouped, and
the rest of the profiled step's wall time (Python: the model's modules, the runner, the scheduler and sampling
glue, and the profiler's own cost per op); `step_ms` is the same request's step without the profiler.
The configs are profiled alternately, `--rounds` times; each figure is from the round with the fastest step.

    .venv/bin/python bench/weight_only_profile.py MODEL_DIR [--rounds 2] [--out FILE.json]"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.bench import bench_engine, machine_info, random_prompts
from tandem.engine import Engine

INPUT_LEN, VOCAB = 32, 32000
GROUPS = {  # op name -> group; anything else is "other ops"
    "aten::_weight_int8pack_mm": "int8 kernel (_weight_int8pack_mm)",
    "aten::_weight_int4pack_mm_for_cpu": "int4 kernel (_weight_int4pack_mm_for_cpu)",
    "aten::mm": "bf16 / float32 matmuls (linears, LM head)", "aten::addmm": "bf16 / float32 matmuls (linears, LM head)",
    "aten::copy_": "dtype conversions and copies", "aten::_to_copy": "dtype conversions and copies",
    "aten::bmm": "attention (bmm, softmax, KV pool)", "aten::_softmax": "attention (bmm, softmax, KV pool)",
    "aten::index_select": "attention (bmm, softmax, KV pool)", "aten::index_copy_": "attention (bmm, softmax, KV pool)",
}


MATMULS = ("aten::mm", "aten::addmm", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu")


def decode_profile(engine, steps: int) -> dict:
    """Per decode step: wall ms and op self ms by group, from one profiled request of 1 + steps tokens."""
    prompts = random_prompts(1, INPUT_LEN, VOCAB, seed=1)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        result = bench_engine(engine, prompts, 1 + steps)
    events = list(prof.events())
    # the prefill's last product of all INPUT_LEN rows ends it (decode products have one row; the prefill's
    # one-row LM head product after it is counted with the decode steps, ~1 / steps of one LM head)
    prefill_end = max(e.time_range.end for e in events if e.name in MATMULS and e.input_shapes
                      and e.input_shapes[0] and e.input_shapes[0][0] == INPUT_LEN)
    groups: dict[str, float] = {}
    for e in events:
        if e.time_range.start > prefill_end:
            group = GROUPS.get(e.name, "other ops")
            groups[group] = groups.get(group, 0.0) + e.self_cpu_time_total / 1e3 / steps
    wall = result.itl_p50_ms
    groups["Python and glue (wall - ops; includes the profiler's own cost)"] = wall - sum(groups.values())
    plain = bench_engine(engine, prompts, 1 + steps).itl_p50_ms
    return {"step_ms": plain, "profiled_step_ms": wall,
            "groups_ms": {k: round(v, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    specs = ("", "int8wo", "int4wo-128")
    engines = {spec or "bf16": Engine(args.model, dtype="bfloat16", progress=False, torchao_config=spec,
                                      max_total_tokens=4096) for spec in specs}
    best: dict[str, dict] = {}
    loads = [os.getloadavg()]
    try:
        for engine in engines.values():
            bench_engine(engine, random_prompts(1, INPUT_LEN, VOCAB, seed=9), 4)  # warm-up
        for _ in range(args.rounds):
            for label, engine in engines.items():
                got = decode_profile(engine, args.steps)
                if label not in best or got["step_ms"] < best[label]["step_ms"]:
                    best[label] = got
                print(label, json.dumps(got), flush=True)
            loads.append(os.getloadavg())
    finally:
        for engine in engines.values():
            engine.shutdown()
    result = {"model": Path(args.model).name, "batch": 1, "threads": 1, "machine": machine_info(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg": loads, "profiles": best}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
