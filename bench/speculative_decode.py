"""Decode speed with and without NGRAM speculative decoding on a repetitive workload, side by side in one run.

    .venv/bin/python bench/speculative_decode.py --model /tmp/tandem-bench-models/llama-dense [--reps 3]

For each pp size, one engine without speculation and one with `--speculative-algorithm NGRAM` are started and
kept; each batch size then runs on them alternately (plain, NGRAM, plain, ...) `reps` times, and the best run of
each is kept. The prompts repeat one random block of `--period` tokens (`tandem.bench.repetitive_prompts`), a
workload whose continuation n-gram lookups can draft. Decode tokens/s counts the tokens produced after every
request has its first token, over that window (the prefill phase is excluded). Greedy outputs of the two
engines are compared: equal token for token in float32 (the default); in bf16 they may part at a near-tie,
and the first position where they do is recorded."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.bench import accept_length, machine_info, repetitive_prompts, timed_decode
from tandem.engine import Engine
from tandem.runtime.sampling.params import SamplingParams


def decode_run(engine: Engine, prompts: list[list[int]], output_len: int) -> dict:
    params = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
    decoded, seconds, reqs = timed_decode(engine, prompts, params)
    return {"decode_tok_s": decoded / seconds, "accept_length": accept_length(reqs),
            "outputs": [r.output_ids for r in reqs]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--pp", default="1,2")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--period", type=int, default=8)
    parser.add_argument("--num-steps", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="bench/results/speculative_ngram.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for pp in [int(x) for x in args.pp.split(",")]:
        common = {"pp_size": pp, "dtype": args.dtype, "progress": False, "max_total_tokens": 16384,
                  "disable_radix_cache": True}
        with Engine(args.model, **common) as plain, \
                Engine(args.model, speculative_algorithm="NGRAM", speculative_num_steps=args.num_steps,
                       **common) as spec:
            for batch in [int(x) for x in args.batches.split(",")]:
                prompts = repetitive_prompts(batch, args.input_len, plain.model_config.vocab_size, args.period)
                decode_run(plain, prompts[:1], 8)  # warm-up
                decode_run(spec, prompts[:1], 8)
                best: dict[str, dict] = {}
                for _ in range(args.reps):
                    for label, engine in (("plain", plain), ("ngram", spec)):
                        run = decode_run(engine, prompts, args.output_len)
                        if label not in best or run["decode_tok_s"] > best[label]["decode_tok_s"]:
                            best[label] = run
                same = best["plain"]["outputs"] == best["ngram"]["outputs"]
                # bf16: a verify span's multi-token forward rounds differently from a one-token decode, so
                # greedy tokens may part at a near-tie; the first position where any request's do
                first = min((next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                             for x, y in zip(best["plain"]["outputs"], best["ngram"]["outputs"])), default=0)
                row = {"pp": pp, "batch": batch, "plain_decode_tok_s": round(best["plain"]["decode_tok_s"], 2),
                       "ngram_decode_tok_s": round(best["ngram"]["decode_tok_s"], 2),
                       "speedup": round(best["ngram"]["decode_tok_s"] / best["plain"]["decode_tok_s"], 3),
                       "accept_length": round(best["ngram"]["accept_length"], 3), "greedy_outputs_equal": same,
                       "first_difference": None if same else first}
                print(row, flush=True)
                rows.append(row)
    result = {"benchmark": "bench/speculative_decode.py", "model": args.model, "settings": vars(args),
              "machine": machine_info(), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
