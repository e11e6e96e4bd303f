"""`tandem bench`: offline throughput/latency of an engine configuration, `--shared-prefix-len` prefill with and
without the radix cache side by side, or `--serving` against a server."""

from __future__ import annotations

import json
import time

from tandem.commands.engine_flags import add_engine_flags, engine_kwargs


def add_parser(sub) -> None:
    parser = sub.add_parser("bench", help="Measure throughput and latency.",
                            description="Offline: N prompts of I random tokens, O new tokens each. "
                                        "--shared-prefix-len P: N prompts of one shared P-token prefix plus I "
                                        "distinct tokens, prefill throughput and time to first token with and "
                                        "without the radix cache. --serving: stream completions from a running "
                                        "server.")
    add_engine_flags(parser)
    parser.add_argument("--num-prompts", type=int, default=16, help="Number of prompts (default: 16).")
    parser.add_argument("--input-len", type=int, default=32, help="Prompt length in tokens (default: 32).")
    parser.add_argument("--output-len", type=int, default=64, help="New tokens per prompt (default: 64).")
    parser.add_argument("--warmup", type=int, default=1, help="Warm-up runs before measuring (default: 1).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random prompts (default: 0).")
    parser.add_argument("--repeat-period", type=int, default=0,
                        help="Repetitive prompts: each repeats one random block of this many tokens (a workload "
                             "NGRAM speculation drafts well); default 0: random prompts.")
    parser.add_argument("--shared-prefix-len", type=int, default=0,
                        help="Shared-prefix workload: every prompt starts with the same P tokens, followed by "
                             "--input-len distinct ones; measured with and without the radix cache.")
    parser.add_argument("--serving", action="store_true", help="Benchmark a running server instead.")
    parser.add_argument("--base-url", default="http://127.0.0.1:30000", help="Server URL for --serving.")
    parser.add_argument("--concurrency", type=int, default=8, help="Requests in flight for --serving.")
    parser.add_argument("--json", dest="json_out", help="Also write the result as JSON to this file.")
    parser.add_argument("--timeline", help="Also draw each rank's busy intervals of the measured run into this "
                                           "image (e.g. out.png; needs matplotlib, the bench extra).")
    parser.set_defaults(run=run)


def run(args) -> int:
    from tandem.bench import bench_engine, bench_server, format_table, random_prompts, repetitive_prompts

    if args.shared_prefix_len:
        return run_shared_prefix(args)
    if args.serving and args.timeline:
        raise SystemExit("--timeline draws the ranks of an offline run; it does not apply to --serving")
    if args.serving:
        words = ["alpha", "beta", "gamma", "delta", "12+34=", "hello"]
        prompts = [" ".join(words[(i + j) % len(words)] for j in range(args.input_len // 2))
                   for i in range(args.num_prompts)]
        result = bench_server(args.base_url, prompts, args.output_len, args.concurrency)
    else:
        from tandem.engine import Engine

        with Engine(progress=False, **engine_kwargs(args)) as engine:
            vocab = engine.model_config.vocab_size
            prompts = (repetitive_prompts(args.num_prompts, args.input_len, vocab, args.repeat_period, args.seed)
                       if args.repeat_period else random_prompts(args.num_prompts, args.input_len, vocab, args.seed))
            for _ in range(args.warmup):
                bench_engine(engine, prompts[:2], 4)
            label = f"tp{args.tp_size} pp{args.pp_size}"
            start = time.time()  # the clock of the ranks' step_times
            result = bench_engine(engine, prompts, args.output_len, label)
            if args.timeline:
                draw_run_timeline(engine, start, time.time(), args.timeline, label)
    print(format_table([result]))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    return 0


def run_shared_prefix(args) -> int:
    """The same engine settings twice, with the radix cache and without, on the same prompts."""
    from tandem.bench import bench_shared_prefix, format_prefill_table, machine_info, shared_prefix_prompts
    from tandem.engine import Engine

    results = []
    for radix in (True, False):
        kwargs = dict(engine_kwargs(args), disable_radix_cache=not radix)
        with Engine(progress=False, **kwargs) as engine:
            vocab = engine.model_config.vocab_size
            for _ in range(args.warmup):  # another prefix: the measured one must not be cached yet
                warm = shared_prefix_prompts(2, args.shared_prefix_len, args.input_len, vocab, args.seed + 1)
                bench_shared_prefix(engine, warm, args.shared_prefix_len, "warm-up")
            prompts = shared_prefix_prompts(args.num_prompts, args.shared_prefix_len, args.input_len, vocab, args.seed)
            label = f"tp{args.tp_size} pp{args.pp_size} radix {'on' if radix else 'off'}"
            results.append(bench_shared_prefix(engine, prompts, args.shared_prefix_len, label))
    print(format_prefill_table(results))
    with_cache, without = results
    print(f"radix cache: {without.ttft_mean_ms / with_cache.ttft_mean_ms:.2f}x lower mean TTFT, "
          f"{with_cache.prefill_tokens_per_s / without.prefill_tokens_per_s:.2f}x prompt tokens/s")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"workload": "shared-prefix", "model_path": args.model_path, "dtype": args.dtype,
                       "machine": machine_info(), "results": [r.to_dict() for r in results],
                       "ttft_speedup": without.ttft_mean_ms / with_cache.ttft_mean_ms,
                       "prefill_speedup": with_cache.prefill_tokens_per_s / without.prefill_tokens_per_s}, f, indent=2)
    return 0
def draw_run_timeline(engine, start: float, end: float, path: str, label: str) -> None:
    from tandem.timeline import draw_timeline, rank_rows

    rows = rank_rows(engine.stage_report(), start, end)
    draw_timeline(rows, path, num_colors=engine.num_micro_batches,
                  title=f"{label}: busy intervals per rank (colour: step number mod {engine.num_micro_batches})")
    print(f"timeline: {path}")
