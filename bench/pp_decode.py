"""Decode pipeline efficiency: pp=2 vs pp=1 at equal micro-batch size (issue 12, first table row), measured
alternately in one run, plus each stage's busy fraction from `stage_report()["step_times"]`.

    .venv/bin/python bench/pp_decode.py --model /tmp/tandem-bench-models/llama-dense [--batch 32] [--reps 3]

A configuration "pp=P, M micro-batches" runs M * batch requests, so every step carries `batch` decode rows, as
pp=1 does with `batch` requests. Decode throughput counts only the tokens produced after every request has
its first token (the prefill phase is excluded) and divides by that window. `--only LABEL` runs one
configuration in a loop for a profiler (py-spy) to attach to."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.bench import random_prompts
from tandem.engine import Engine
from tandem.runtime.sampling.params import SamplingParams
from tandem.runtime.scheduling.scheduler import Request


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one by default), all its threads."""
    if pid is None:
        return time.process_time()
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu(engine: Engine) -> dict[str, float]:
    """CPU seconds so far of the driver (this process) and of each rank process, if any."""
    out = {"driver": cpu_seconds()}
    for i, proc in enumerate(getattr(engine.executor, "procs", [])):
        out[f"rank{i}"] = cpu_seconds(proc.pid)
    return out


def decode_run(engine: Engine, num_requests: int, input_len: int, output_len: int, seed: int) -> dict:
    """One batch of requests to completion; returns decode tokens/s, the stages' busy fractions and the CPU
    seconds each process spent on the whole run (prefill included)."""
    prompts = random_prompts(num_requests, input_len, engine.model_config.vocab_size, seed)
    params = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
    times: list[list[float]] = [[] for _ in prompts]

    def recorder(i):
        def on_update(req):
            while len(times[i]) < len(req.output_ids):
                times[i].append(time.time())
        return on_update

    reqs = [Request(list(p), params, on_update=recorder(i), output_logprobs_wanted=False)
            for i, p in enumerate(prompts)]
    cpu_before = process_cpu(engine)
    engine.run_requests(reqs)
    cpu = {k: v - cpu_before[k] for k, v in process_cpu(engine).items()}
    start = max(t[0] for t in times)
    end = max(t[-1] for t in times)
    tokens = sum(1 for t in times for x in t if x > start)
    reports = engine.stage_report()
    busy = []
    for report in reports:
        inside = [(max(a, start), min(b, end)) for a, b in report["step_times"] if b > start and a < end]
        busy.append(sum(b - a for a, b in inside) / (end - start) if end > start else 0.0)
    return {"decode_tokens_per_s": tokens / (end - start) if end > start else 0.0, "stage_busy": busy,
            "window_s": end - start, "cpu_s": cpu, "output_tokens": sum(len(t) for t in times),
            "layers": [[r["layer_start"], r["layer_end"]] for r in reports],  # the split the partition chose
            "turnaround_ms": turnaround_ms(reports, engine.num_micro_batches, start, end)}


def turnaround_ms(reports: list[dict], micro_batches: int, start: float, end: float) -> list[float]:
    """For each step k of the window that the first stage had to wait for: the time from the last stage
    finishing step k to the first stage starting step k + micro_batches (the same requests' next step),
    i.e. the return path last stage -> driver -> scheduler -> published step -> first stage. Empty for pp=1.
    The i-th interval of every rank is step i (all ranks run all steps, in order)."""
    if len(reports) < 2:
        return []
    first, last = reports[0]["step_times"], reports[-1]["step_times"]
    n = min(len(first), len(last))
    first, last = first[len(first) - n:], last[len(last) - n:]
    gaps = []
    for k in range(n - micro_batches):
        nxt = k + micro_batches
        if not (start <= last[k][1] and first[nxt][0] <= end):
            continue
        if first[nxt - 1][1] < last[k][1]:  # the first stage was idle when step k's tokens came back
            gaps.append((first[nxt][0] - last[k][1]) * 1e3)
    return gaps


def decode_cpu_per_token(engine: Engine, num_requests: int, input_len: int, output_len: int, seed: int) -> dict:
    """CPU seconds per decode token of each process: a run of output_len tokens minus a run of 1 token (same
    prompts, so the same prefill), divided by the decode tokens. Unlike wall-clock rates it hardly changes
    when other processes share the cores."""
    full = decode_run(engine, num_requests, input_len, output_len, seed)
    prefill = decode_run(engine, num_requests, input_len, 1, seed)
    tokens = full["output_tokens"] - prefill["output_tokens"]
    return {k: (full["cpu_s"][k] - prefill["cpu_s"][k]) / tokens for k in full["cpu_s"]} | {"run": full}


def describe(result: dict) -> str:
    run = result["run"]
    cpu = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in result.items() if k != "run")
    gaps = sorted(run["turnaround_ms"])
    turn = f", turnaround ms p50 {gaps[len(gaps) // 2]:.2f} (n={len(gaps)})" if gaps else ""
    return (f"{run['decode_tokens_per_s']:.0f} tok/s, layers {run['layers']}, "
            f"busy {[round(b, 2) for b in run['stage_busy']]}, "
            f"cpu ms/token {cpu}{turn}")


def summarize(results: list[dict]) -> dict:
    """Medians over repetitions. cpu_bound_tokens_per_s: the rate if every process had a core of its own and
    the busiest stage never waited (1 / the largest per-token CPU time among the stages)."""
    import statistics

    wall = [r["run"]["decode_tokens_per_s"] for r in results]
    keys = [k for k in results[0] if k != "run"]
    cpu = {k: statistics.median(r[k] for r in results) for k in keys}
    stages = [k for k in keys if k.startswith("rank")] or ["driver"]
    busy = [round(statistics.median(r["run"]["stage_busy"][i] for r in results), 3)
            for i in range(len(results[0]["run"]["stage_busy"]))]
    gaps = sorted(g for r in results for g in r["run"]["turnaround_ms"])
    return {"turnaround_ms_p50": gaps[len(gaps) // 2] if gaps else None,
            "turnaround_ms_p90": gaps[int(len(gaps) * 0.9)] if gaps else None,
            "wall_tokens_per_s": statistics.median(wall), "wall_min": min(wall), "wall_max": max(wall),
            "cpu_ms_per_token": {k: round(v * 1e3, 3) for k, v in cpu.items()},
            "cpu_bound_tokens_per_s": 1 / max(cpu[k] for k in stages), "stage_busy": busy,
            "layers": results[0]["run"]["layers"]}


def parse_label(label: str) -> tuple[int, int, str | None]:
    """"pp1", "pp2 mb3" or "pp2 mb2 6,2" (an explicit layer partition): (pp_size, micro-batches, partition)."""
    words = label.split()
    pp = int(words[0].removeprefix("pp"))
    micro = int(words[1].removeprefix("mb")) if len(words) > 1 else pp
    return pp, micro, words[2] if len(words) > 2 else None


def start(model: str, label: str, batch: int, context: int, partition: str, device: str = "cpu") -> Engine:
    pp, micro, explicit = parse_label(label)
    return Engine(model, dtype="bfloat16", device=device, pp_size=pp, num_micro_batches=micro,
                  max_running_requests=batch * micro, context_length=context, progress=False, log_level="warning",
                  pp_layer_partition=(explicit or partition) if pp > 1 else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=32, help="decode rows per step (micro-batch size)")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--configs", default="pp1;pp2 mb2;pp2 mb3",
                        help="';'-separated labels: pp1, pp2 mb3 (micro-batches), pp2 mb2 6,2 (explicit partition)")
    parser.add_argument("--partition", default="auto-latency", help="layer partition of pp>1 labels without one")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per rank)")
    parser.add_argument("--only", help="run this one configuration for --seconds (for a profiler)")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    context = args.input_len + args.output_len + 8
    if args.only:
        engine = start(args.model, args.only, args.batch, context, args.partition, args.device)
        micro = parse_label(args.only)[1]
        decode_run(engine, args.batch * micro, args.input_len, 4, 0)  # warm-up
        deadline = time.time() + args.seconds
        while time.time() < deadline:
            print(json.dumps(decode_run(engine, args.batch * micro, args.input_len, args.output_len, 1)), flush=True)
        engine.shutdown()
        return 0
    labels = args.configs.split(";")
    engines = {label: start(args.model, label, args.batch, context, args.partition, args.device)
               for label in labels}
    runs: dict[str, list[dict]] = {label: [] for label in labels}
    try:
        for label, engine in engines.items():
            decode_run(engine, args.batch * parse_label(label)[1], args.input_len, 4, 0)
        for rep in range(args.reps):
            for label, engine in engines.items():
                runs[label].append(decode_cpu_per_token(engine, args.batch * parse_label(label)[1], args.input_len,
                                                        args.output_len, rep + 1))
            print(f"rep {rep + 1}: " + "; ".join(f"{k} {describe(v[-1])}" for k, v in runs.items()), flush=True)
    finally:
        for engine in engines.values():
            engine.shutdown()
    summary = {label: summarize(results) for label, results in runs.items()}
    base = summary.get("pp1")
    for label, s in summary.items():
        ratio = (f"  wall x{s['wall_tokens_per_s'] / base['wall_tokens_per_s']:.2f}, cpu-bound x"
                 f"{s['cpu_bound_tokens_per_s'] / base['cpu_bound_tokens_per_s']:.2f} of pp1") if base else ""
        print(f"{label:<12} wall {s['wall_tokens_per_s']:7.1f} tok/s (min {s['wall_min']:.1f}, max {s['wall_max']:.1f}); "
              f"cpu ms/token {s['cpu_ms_per_token']}; busy {s['stage_busy']}; turnaround ms p50/p90 "
              f"{s['turnaround_ms_p50']}/{s['turnaround_ms_p90']}{ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "batch": args.batch, "input_len": args.input_len,
                                               "output_len": args.output_len, "summary": summary, "runs": runs},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
