"""Hybrid prefix hits through the previous answer (issue 20 part 3): a system-prompt workload and a multi-turn
chat on Qwen3.5-style hybrids (dense and MoE, random bf16 weights, built here), radix cache on and off, for
this tree and a baseline tree (`--baseline-tree /work/main`), alternately in one run.

    .venv/bin/python bench/hybrid_turns.py --baseline-tree /work/main [--reps 3] [--out bench/results]

Both workloads send one request at a time, as the users of one system prompt or one chat do:
- system prompt: U users, each a 300-token system prompt plus a distinct 64-token question, 8 new tokens;
- chat: C conversations of T turns; turn k's prompt is turn k-1's prompt, its 32-token answer and a new
  64-token message.
Reported per workload: CPU seconds of the (single-threaded, in-process) engine, wall seconds, prompt tokens,
tokens served by the prefix cache, mean time to first token. Ratios are of CPU seconds: on a shared machine
wall time follows the load of other processes, the work done does not. Each configuration runs in its own
process (`--worker`) with the tree's `tandem` first on sys.path and one torch thread."""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

SYSTEM, QUESTION, MESSAGE, ANSWER = 300, 64, 64, 32
USERS, CONVERSATIONS, TURNS = 8, 4, 4
VOCAB = 32000


def build_models(root: Path) -> dict[str, Path]:
    import torch
    from transformers import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM
    from transformers.models.qwen3_5 import Qwen3_5TextConfig
    from transformers.models.qwen3_5_moe import Qwen3_5MoeTextConfig

    common = dict(vocab_size=VOCAB, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8,
                  linear_key_head_dim=64, linear_value_head_dim=64, max_position_embeddings=2048,
                  tie_word_embeddings=False)
    specs = {
        "qwen3.5-dense-2k": (Qwen3_5ForCausalLM, Qwen3_5TextConfig(intermediate_size=1536, **common)),
        "qwen3.5-moe-2k": (Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig(
            num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256, shared_expert_intermediate_size=512,
            **common)),
    }
    paths = {}
    for name, (cls, config) in specs.items():
        path = root / name
        if not (path / "config.json").exists():
            torch.manual_seed(0)
            cls(config).to(torch.bfloat16).save_pretrained(path)
        paths[name] = path
    return paths


def timed(engine, ids: list[int], new_tokens: int) -> tuple[list[int], int, float]:
    """(output ids, cached tokens, seconds to the first token) of one request run alone."""
    from tandem.runtime.sampling.params import SamplingParams
    from tandem.runtime.scheduling.scheduler import Request

    first: list[float] = []
    req = Request(list(ids), SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True),
                  on_update=lambda r: r.output_ids and not first and first.append(time.perf_counter()),
                  output_logprobs_wanted=False)
    start = time.perf_counter()
    engine.run_requests([req])
    return req.output_ids, req.cached_tokens, first[0] - start


def system_prompt_workload(engine, seed: int) -> dict:
    rng = random.Random(seed)
    system = [rng.randrange(10, VOCAB) for _ in range(SYSTEM)]
    totals = {"prompt_tokens": 0, "cached_tokens": 0, "ttft": []}
    start = time.perf_counter(), time.process_time()
    for _ in range(USERS):
        prompt = system + [rng.randrange(10, VOCAB) for _ in range(QUESTION)]
        _, cached, ttft = timed(engine, prompt, 8)
        totals["prompt_tokens"] += len(prompt)
        totals["cached_tokens"] += cached
        totals["ttft"].append(ttft)
    return summary(totals, start)


def chat_workload(engine, seed: int) -> dict:
    rng = random.Random(seed)
    totals = {"prompt_tokens": 0, "cached_tokens": 0, "ttft": []}
    start = time.perf_counter(), time.process_time()
    for _ in range(CONVERSATIONS):
        history = [rng.randrange(10, VOCAB) for _ in range(SYSTEM)]
        for _ in range(TURNS):
            prompt = history + [rng.randrange(10, VOCAB) for _ in range(MESSAGE)]
            answer, cached, ttft = timed(engine, prompt, ANSWER)
            totals["prompt_tokens"] += len(prompt)
            totals["cached_tokens"] += cached
            totals["ttft"].append(ttft)
            history = prompt + answer
    return summary(totals, start)


def summary(totals: dict, start: tuple[float, float]) -> dict:
    ttft = totals.pop("ttft")
    return {**totals, "seconds": time.perf_counter() - start[0], "cpu_seconds": time.process_time() - start[1],
            "ttft_mean_ms": 1000 * sum(ttft) / len(ttft)}


def worker(model: str, radix: bool, seed: int) -> dict:
    import torch

    from tandem.engine import Engine

    torch.set_num_threads(1)
    with Engine(model, dtype="bfloat16", progress=False, disable_radix_cache=not radix) as engine:
        system_prompt_workload(engine, seed + 1000)  # warm-up (another system prompt)
        return {"system_prompt": system_prompt_workload(engine, seed), "chat": chat_workload(engine, seed)}


def run_worker(tree: Path, model: Path, radix: bool, seed: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", "--model", str(model), "--seed", str(seed)]
    out = subprocess.run(cmd + ([] if radix else ["--no-radix"]), env=env, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-tree", type=Path, help="another checkout to measure alongside this one")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--models-dir", default="/tmp/tandem-bench-models")
    parser.add_argument("--only", help="measure only this model (by name)")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--model")
    parser.add_argument("--no-radix", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, not args.no_radix, args.seed)))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tandem.bench import machine_info

    here = Path(__file__).resolve().parents[1]
    trees = {"this tree": here} | ({"baseline": args.baseline_tree.resolve()} if args.baseline_tree else {})
    configs = [(tree, radix) for tree in trees for radix in (True, False) if radix or tree == "this tree"]
    for name, model in build_models(Path(args.models_dir)).items():
        if args.only and name != args.only:
            continue
        load_before = os.getloadavg()
        runs: dict[str, list[dict]] = {f"{tree}, radix {'on' if radix else 'off'}": [] for tree, radix in configs}
        for rep in range(args.reps):  # alternately, so that a slow spell of the machine hits every configuration
            for tree, radix in configs:
                runs[f"{tree}, radix {'on' if radix else 'off'}"].append(run_worker(trees[tree], model, radix, rep))
        result = {"workload": "hybrid system prompt and chat turns, one request at a time", "model": name,
                  "load_average_before": load_before,
                  "dtype": "bfloat16", "machine": machine_info(), "reps": args.reps, "trees": {k: str(v) for k, v in
                  trees.items()}, "runs": runs, "best": best_of(runs)}
        result["ratios"] = ratios(result["best"])
        result["load_average_after"] = os.getloadavg()
        Path(args.out, f"hybrid_turns_{name}.json").write_text(json.dumps(result, indent=2))
        print(name, json.dumps(result["ratios"], indent=1))
    return 0


def best_of(runs: dict[str, list[dict]]) -> dict:
    """Per configuration and workload, the repetition with the fewest CPU seconds."""
    return {label: {w: min((r[w] for r in reps), key=lambda x: x["cpu_seconds"]) for w in ("system_prompt", "chat")}
            for label, reps in runs.items()}


def ratios(best: dict) -> dict:
    base = best.get("baseline, radix on")
    out = {}
    for w in ("system_prompt", "chat"):
        on, off = best["this tree, radix on"][w], best["this tree, radix off"][w]
        out[w] = {"cached_fraction": on["cached_tokens"] / on["prompt_tokens"],
                  "cpu_seconds_off_over_on": off["cpu_seconds"] / on["cpu_seconds"]}
        if base is not None:
            out[w] |= {"baseline_cached_fraction": base[w]["cached_tokens"] / base[w]["prompt_tokens"],
                       "cpu_seconds_baseline_over_this": base[w]["cpu_seconds"] / on["cpu_seconds"]}
    return out


if __name__ == "__main__":
    sys.exit(main())
