"""NEXTN (the bundled model's trained MTP head) against plain decoding on the counting task, side by side.

    .venv/bin/python bench/speculative_nextn.py [--model models/default] [--pp 1,2] [--batches 1,4,16]

For each pp size one engine without speculation and one with `--speculative-algorithm NEXTN` (3 steps, 4 draft
tokens) are started and kept; each batch size then runs on them alternately (plain, NEXTN, plain, ...) `reps`
times and the best run of each is kept. A run answers `--problems` held-out counting problems ("17..26=" ->
"17 18 ... 26", 9 to 39 tokens, then EOS), `batch` at a time, greedily. Decode tokens/s: for each group of
`batch` requests, the tokens produced after every request of the group has its first token, over that window,
summed over the groups (prefill excluded). Greedy outputs of both engines are compared token for token and
checked against the task's answers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.bench import accept_length, machine_info, timed_decode
from tandem.engine import Engine
from tandem.evaluation.counting import MAX_ANSWER_TOKENS, heldout_count_problems, is_count_correct
from tandem.runtime.sampling.params import SamplingParams


def run(engine: Engine, prompts: list[list[int]], batch: int) -> dict:
    params = SamplingParams(max_new_tokens=MAX_ANSWER_TOKENS, temperature=0.0)
    tokens, seconds, reqs = 0, 0.0, []
    for i in range(0, len(prompts), batch):
        n, s, group = timed_decode(engine, prompts[i:i + batch], params)
        tokens, seconds, reqs = tokens + n, seconds + s, reqs + group
    return {"decode_tok_s": tokens / seconds if seconds else 0.0, "accept_length": accept_length(reqs),
            "outputs": [r.output_ids for r in reqs], "texts": [engine.text_of(r) for r in reqs]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/default")
    parser.add_argument("--pp", default="1,2")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--num-steps", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", default="bench/results/speculative_nextn.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    problems = heldout_count_problems()[:args.problems]
    rows = []
    for pp in [int(x) for x in args.pp.split(",")]:
        common = {"pp_size": pp, "progress": False, "log_level": "warning"}
        with Engine(args.model, **common) as plain, \
                Engine(args.model, speculative_algorithm="NEXTN", speculative_num_steps=args.num_steps,
                       speculative_eagle_topk=1, speculative_num_draft_tokens=args.num_steps + 1, **common) as spec:
            prompts = [plain.tokenizer.encode(p.completion_prompt) for p in problems]
            run(plain, prompts[:2], 2)  # warm-up
            run(spec, prompts[:2], 2)
            for batch in [int(x) for x in args.batches.split(",")]:
                best: dict[str, dict] = {}
                for _ in range(args.reps):
                    for label, engine in (("plain", plain), ("nextn", spec)):
                        result = run(engine, prompts, batch)
                        if label not in best or result["decode_tok_s"] > best[label]["decode_tok_s"]:
                            best[label] = result
                correct = sum(is_count_correct(t, p) for t, p in zip(best["nextn"]["texts"], problems))
                row = {"pp": pp, "batch": batch, "plain_decode_tok_s": round(best["plain"]["decode_tok_s"], 1),
                       "nextn_decode_tok_s": round(best["nextn"]["decode_tok_s"], 1),
                       "speedup": round(best["nextn"]["decode_tok_s"] / best["plain"]["decode_tok_s"], 3),
                       "accept_length": round(best["nextn"]["accept_length"], 3),
                       "greedy_outputs_equal": best["plain"]["outputs"] == best["nextn"]["outputs"],
                       "correct": f"{correct}/{len(problems)}"}
                print(row, flush=True)
                rows.append(row)
    result = {"benchmark": "bench/speculative_nextn.py", "model": args.model, "settings": vars(args),
              "machine": machine_info(), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
