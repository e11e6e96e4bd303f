"""Structured output's cost, side by side in one run: 32 concurrent json_schema requests vs the same 32
unconstrained (decode tokens/s, alternated), the grammar compile time of a tool-call schema, and the mask's
cost as a share of a 32-row decode step (the driver filling 32 bitmasks + the last stage unpacking and
applying them, against the step time of the unconstrained run).

The model is compare.py's llama-dense shape (8 layers, hidden 512, random weights) with the byte-level BPE of
bench/grammar_backends.py (94,518 tokens trained on local Python sources; no real tokenizer is on this
machine), so the vocabulary and the LM head have a realistic size.

    python bench/structured_output.py --out bench/results/structured_output.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from grammar_backends import TOOL_SCHEMA, build_tokenizer, cpu_name

from tandem.bench import random_prompts
from tandem.engine import Engine
from tandem.runtime.sampling.params import SamplingParams
from tandem.runtime.sampling.token_mask import TokenMask, apply_token_mask, unpack_bitmask
from tandem.runtime.scheduling.scheduler import Request

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                         "city": {"type": "string", "maxLength": 24}, "tags": {"type": "array", "maxItems": 4,
                                                                                "items": {"type": "string",
                                                                                          "maxLength": 8}}},
          "required": ["name", "age", "city", "tags"], "additionalProperties": False}


def build_model(root: Path, tokenizer_dir: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = root / "llama-dense-bpe"
    if (path / "config.json").exists():
        return path
    tokenizer = build_tokenizer(tokenizer_dir, 151_643)
    vocab = -(-len(tokenizer) // 64) * 64
    config = LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return path


def run(engine: Engine, prompts, params: SamplingParams) -> dict:
    reqs = [Request(list(p), params, output_logprobs_wanted=False) for p in prompts]
    start = time.perf_counter()
    engine.run_requests(reqs)
    wall = time.perf_counter() - start
    tokens = sum(len(r.output_ids) for r in reqs)
    return {"tokens_per_s": tokens / wall, "wall_s": wall, "tokens": tokens,
            "finish_stop": sum(r.finish_reason["type"] == "stop" for r in reqs)}


def mask_cost(engine: Engine, rows: int, repeat: int) -> dict:
    """Driver: fill `rows` bitmasks for requests mid-way through a json_schema output and advance their
    matchers by one token; last stage: unpack and apply them to [rows, V] logits. Medians over `repeat` calls, in ms."""
    tracker = engine.constraints
    params = SamplingParams(json_schema=json.dumps(SCHEMA))
    prefix = engine.tokenizer.encode('{"name": "Ann", "age": 3')
    reqs = [Request([1], params, rid=f"bench-{i}", output_ids=list(prefix)) for i in range(rows)]
    fill, accept, apply = [], [], []
    vocab = engine.model_config.vocab_size
    logits = torch.randn(rows, vocab)
    for _ in range(repeat):
        for r in reqs:
            tracker.reset(r)
            tracker.masks([r], [True])  # rebuild the matchers outside the timed call
        start = time.perf_counter()
        masked_rows, data = tracker.masks(reqs, [True] * rows)
        fill.append(time.perf_counter() - start)
        digit = engine.tokenizer.encode("4")[0]
        for r in reqs:
            r.output_ids.append(digit)
        start = time.perf_counter()
        for r in reqs:
            tracker.accept(r, digit)
        accept.append(time.perf_counter() - start)
        for r in reqs:
            r.output_ids.pop()
        start = time.perf_counter()
        mask = TokenMask(masked_rows, unpack_bitmask(data, rows, vocab, logits.device))
        apply_token_mask(logits, logits, mask)
        apply.append(time.perf_counter() - start)
    for r in reqs:
        tracker.release(r)
    return {"driver_fill_ms": statistics.median(fill) * 1e3, "driver_accept_ms": statistics.median(accept) * 1e3,
            "rank_apply_ms": statistics.median(apply) * 1e3,
            "bitmask_bytes": len(data)}


def compile_time(engine: Engine) -> dict:
    from tandem.runtime.constraints.grammars import GrammarCache

    times = {}
    for name, schema in (("tool_schema", TOOL_SCHEMA), ("bench_schema", SCHEMA)):
        cache = GrammarCache(engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids)  # cold
        start = time.perf_counter()
        cache.get(("json_schema", json.dumps(schema)))
        times[f"{name}_ms"] = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        cache.get(("json_schema", json.dumps(schema)))
        times[f"{name}_cached_ms"] = (time.perf_counter() - start) * 1e3
        cache.shutdown()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/tandem-bench-models"))
    parser.add_argument("--tokenizer-dir", type=Path, default=Path("/tmp/tandem-bench-bpe151k"))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = build_model(args.models_dir, args.tokenizer_dir)
    with Engine(path, dtype="float32", progress=False, max_running_requests=args.requests) as engine:
        prompts = random_prompts(args.requests, 16, len(engine.tokenizer), seed=0)
        plain = SamplingParams(temperature=0.8, max_new_tokens=args.output_len, ignore_eos=True)
        constrained = SamplingParams(temperature=0.8, max_new_tokens=args.output_len, ignore_eos=True,
                                     json_schema=json.dumps(SCHEMA))
        engine.check_constraint(constrained)
        run(engine, prompts[:4], plain)  # warm-up
        results = {"unconstrained": [], "json_schema": []}
        for _ in range(args.reps):
            results["unconstrained"].append(run(engine, prompts, plain))
            results["json_schema"].append(run(engine, prompts, constrained))
        tps = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in results.items()}
        step_ms = 1e3 * args.requests / tps["unconstrained"]  # every decode step carries all 32 rows
        mask = mask_cost(engine, args.requests, 20)
        result = {
            "machine": {"cpu": cpu_name(), "torch_threads": torch.get_num_threads()},
            "model": "llama-dense (8 layers, hidden 512) random bf16 weights, run in fp32, pp=1",
            "vocab_size": engine.model_config.vocab_size, "requests": args.requests,
            "output_len": args.output_len, "runs": results,
            "tokens_per_s": tps, "json_schema_over_unconstrained": tps["json_schema"] / tps["unconstrained"],
            "decode_step_ms_32_rows": step_ms, "mask": mask,
            "mask_share_of_step": (mask["driver_fill_ms"] + mask["driver_accept_ms"] + mask["rank_apply_ms"]) / step_ms,
            "compile": compile_time(engine),
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
