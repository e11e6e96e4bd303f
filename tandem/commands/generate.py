"""`tandem generate`: run one or more prompts through the engine and print the completions."""

from __future__ import annotations

import json

from tandem.commands.engine_flags import add_engine_flags, engine_kwargs


def add_parser(sub) -> None:
    parser = sub.add_parser("generate", help="Generate text for prompts (offline).",
                            description="Generate completions for one or more prompts.")
    add_engine_flags(parser)
    parser.add_argument("--prompt", action="append", help="Prompt text (repeatable).")
    parser.add_argument("--input-ids", help="Prompt token ids as a JSON list (or list of lists).")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="Tokens to generate (default: the engine's, 16, as for /generate).")
    parser.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature; 0 = greedy.")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass (default: 1.0).")
    parser.add_argument("--top-k", type=int, default=-1, help="Top-k sampling; -1 = off.")
    parser.add_argument("--json", action="store_true", help="Print the full results as JSON.")
    parser.set_defaults(run=run)


def run(args) -> int:
    from tandem.engine import Engine, run_worker_node

    if args.node_rank > 0:
        return run_worker_node(**engine_kwargs(args))
    params = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    if args.max_new_tokens is not None:
        params["max_new_tokens"] = args.max_new_tokens
    with Engine(**engine_kwargs(args)) as engine:
        if args.input_ids:
            outs = engine.generate(input_ids=json.loads(args.input_ids), sampling_params=params)
        else:
            outs = engine.generate(prompt=args.prompt or ["Hello"], sampling_params=params)
    for out in outs:
        print(json.dumps(out) if args.json else out.get("text", out["output_ids"]))
    return 0
