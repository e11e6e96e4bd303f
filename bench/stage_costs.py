"""CPU cost of each part of a pp=1 decode step, and what it means for every 2-stage layer partition.

    .venv/bin/python bench/stage_costs.py --model /tmp/tandem-bench-models/llama-dense [--batch 32]

Runs decode in one process and charges the thread CPU time (not wall time: other processes' load hardly
changes it) of every decoder layer, the LM head, the sampler and the rest of the step to its part, per decode
token (a run of 64 tokens minus a run of 1, so prefill is excluded; median of --reps). For each split k, L-k
it prints the two stages' costs (the rest of the step shared evenly) and the pp=2/pp=1 throughput they allow
with perfect overlap: (T0 + T1) / max(T0, T1)."""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pp_decode import decode_run

from tandem.engine import Engine


class CpuCharges:
    """Thread CPU seconds charged to named parts while `active`."""

    def __init__(self):
        self.seconds: collections.Counter = collections.Counter()
        self.active = False

    def wrap(self, name: str, fn):
        def charged(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.thread_time() - start
        return charged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--reps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = Engine(args.model, dtype="bfloat16", max_running_requests=args.batch, progress=False, log_level="warning",
                    context_length=args.input_len + args.output_len + 8)
    runner = engine.executor.runner
    charges = CpuCharges()
    layers = runner.model.model.layers
    for i, layer in enumerate(layers):
        layer.forward = charges.wrap(f"layer {i}", layer.forward)
    runner.model.compute_logits = charges.wrap("lm_head", runner.model.compute_logits)
    runner.sampler.sample = charges.wrap("sampler", runner.sampler.sample)
    runner._execute = charges.wrap("step", runner._execute)

    def per_token(output_len: int) -> dict:
        charges.seconds.clear()
        charges.active = True
        decode_run(engine, args.batch, args.input_len, output_len, 1)
        charges.active = False
        return dict(charges.seconds)

    decode_run(engine, args.batch, args.input_len, 4, 0)  # warm-up
    reps = []
    for _ in range(args.reps):
        full, prefill = per_token(args.output_len), per_token(1)
        tokens = args.batch * (args.output_len - 1)
        reps.append({k: (v - prefill.get(k, 0.0)) / tokens * 1e3 for k, v in full.items()})
    engine.shutdown()
    ms = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
    layer_ms = [ms[f"layer {i}"] for i in range(len(layers))]
    rest = ms["step"] - sum(layer_ms) - ms["lm_head"] - ms["sampler"]
    print(json.dumps({"ms_per_token": {k: round(v, 4) for k, v in ms.items()}, "rest": round(rest, 4)}))
    for k in range(1, len(layer_ms)):
        t0 = sum(layer_ms[:k]) + rest / 2
        t1 = sum(layer_ms[k:]) + ms["lm_head"] + ms["sampler"] + rest / 2
        print(f"partition {k},{len(layer_ms) - k}: stages {t0:.3f} / {t1:.3f} ms per token -> pp2/pp1 at most "
              f"{(t0 + t1) / max(t0, t1):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
