"""`tandem eval`: the pipeline accuracy check. Runs evaluation items through several parallel configurations
(greedy generation, loglikelihood scoring; `tandem.evaluation`) and reports per configuration the accuracy
and the agreement with the first (baseline) configuration. Exits 1 when a configuration's accuracy is more
than `--max-drop` points below the baseline's.

    tandem eval --model-path models/default --configs pp1,pp2,pp4,tp2,tp2pp2 [--limit N] [--json]
    tandem eval --model-path M --data file.jsonl --configs pp1,pp2,tp2pp2 [--out report.json]

Without --data it runs the bundled model's held-out problems of `--task` (addition, or counting: long answers);
with it, the JSONL rows
({"prompt", "answer"} exact match, {"prompt", "choices", "label"} loglikelihood scoring).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from tandem.commands.engine_flags import add_engine_flags, engine_kwargs
from tandem.errors import ConfigError
from tandem.evaluation import addition, counting
from tandem.evaluation.runner import ParallelConfig, check, evaluate, format_table

__all__ = ["ParallelConfig", "add_parser", "check", "exit_code", "parse_configs", "run"]

# Engine settings that `--configs` decides, that only make sense for one configuration, or (the model
# path) that eval defines with a default of its own.
_NOT_ENGINE_FLAGS = ("model_path", "tp_size", "pp_size", "pp_layer_partition", "nnodes", "node_rank",
                     "dist_init_addr")
_CONFIG_RE = re.compile(r"(?:tp(\d+))?(?:pp(\d+))?")
DATA_MAX_NEW_TOKENS = 32  # default generation length for --data rows
TASKS = {"addition": (addition.heldout_problems, addition.MAX_ANSWER_TOKENS),  # held-out set, tokens to generate
         "counting": (counting.heldout_count_problems, counting.MAX_ANSWER_TOKENS)}


def parse_configs(text: str) -> list[ParallelConfig]:
    """"pp1,pp2,tp2,tp2pp2" -> [ParallelConfig("pp1", 1, 1), ...]; tp and pp default to 1."""
    configs = []
    for name in (part.strip() for part in text.split(",")):
        m = _CONFIG_RE.fullmatch(name.lower()) if name else None
        if not m or not any(m.groups()):
            raise ConfigError(f"bad configuration {name!r}: expected tpX, ppY or tpXppY (e.g. pp2, tp2pp2)")
        tp, pp = int(m.group(1) or 1), int(m.group(2) or 1)
        if tp < 1 or pp < 1:
            raise ConfigError(f"bad configuration {name!r}: tp and pp must be at least 1")
        configs.append(ParallelConfig(name, tp, pp))
    if not configs:
        raise ConfigError("--configs is empty")
    return configs


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "eval", help="Check accuracy across parallel configurations (pipeline accuracy check).",
        description="Run evaluation items (the bundled model's addition or counting problems, or --data JSONL rows) "
                    "through "
                    "each configuration and compare accuracy and outputs with the first configuration.")
    parser.add_argument("--model-path", default=None,
                        help="Checkpoint directory (default: models/default, the bundled model).")
    parser.add_argument("--data", default=None,
                        help="JSONL file: {\"prompt\", \"answer\"} rows (exact match of the greedy output) and/or "
                             "{\"prompt\", \"choices\", \"label\"} rows (the choice with the largest loglikelihood "
                             "must be choices[label]). Default: the bundled task named by --task.")
    parser.add_argument("--task", choices=tuple(TASKS), default="addition",
                        help="The bundled model's held-out task: addition (\"12+345=\" -> \"357\") or counting "
                             "(\"17..21=\" -> \"17 18 19 20 21\", long answers) (default: addition).")
    parser.add_argument("--configs", default="pp1,pp2",
                        help="Comma-separated configurations tpXppY, the first is the baseline (default: pp1,pp2).")
    parser.add_argument("--limit", type=int, default=None, help="Evaluate only the first N problems / rows.")
    parser.add_argument("--format", choices=("completion", "chat", "both"), default="completion",
                        help="Prompt form: as written (completion), as one user turn of the chat template (chat), "
                             "or both (default: completion).")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"Tokens to generate per generation item (default: 8 for the addition task, 48 for "
                             f"counting, {DATA_MAX_NEW_TOKENS} for --data).")
    parser.add_argument("--stop", action="append", default=[],
                        help="A stop string for generation items (repeatable); generation also stops at EOS.")
    parser.add_argument("--max-drop", type=float, default=2.0,
                        help="Fail when accuracy is more than this many points below the baseline (default: 2).")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON instead of a table.")
    parser.add_argument("--out", default=None, help="Also write the results as JSON to this file.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the in-process (tp1pp1) engine; 1 (default) does each step's "
                             "arithmetic the way a one-thread rank of a multi-process run does.")
    add_engine_flags(parser, exclude=_NOT_ENGINE_FLAGS)
    parser.set_defaults(run=run)


def load_items(model_path: str, data: str | None, fmt: str, limit: int | None,
               task: str = "addition") -> tuple[str, list]:
    """(task description, evaluation items) of a bundled task or of a JSONL file."""
    from tandem.engine import load_tokenizer
    from tandem.evaluation.tasks import addition_items, data_items, read_jsonl

    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    tokenizer = load_tokenizer(model_path)
    if data is None:
        problems = TASKS[task][0]()[:limit]
        return f"{len(problems)} held-out {task} problems, format {fmt}", addition_items(problems, fmt, tokenizer)
    if tokenizer is None:
        raise ConfigError(f"{model_path} has no tokenizer; tandem eval --data needs one")
    rows = read_jsonl(data)[:limit]
    return f"{data} ({len(rows)} rows), format {fmt}", data_items(rows, fmt, tokenizer)


def exit_code(report: dict, max_drop: float) -> int:
    """Record the verdict in the report (`failed`, `passed`); 1 when a configuration dropped too far, else 0."""
    failed = check(report, max_drop)
    report["failed"], report["passed"], report["max_drop"] = failed, not failed, max_drop
    return 1 if failed else 0


def default_model_path() -> str:
    """models/default of the current directory, else the one next to the tandem package (a checkout)."""
    local = Path("models/default")
    if local.is_dir():
        return str(local)
    return str(Path(__file__).resolve().parents[2] / "models" / "default")


def run(args: argparse.Namespace) -> int:
    configs = parse_configs(args.configs)
    model_path = args.model_path or default_model_path()
    task, items = load_items(model_path, args.data, args.format, args.limit, args.task)
    max_new_tokens = args.max_new_tokens or (DATA_MAX_NEW_TOKENS if args.data else TASKS[args.task][1])
    log = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    report = evaluate(model_path, configs, items, max_new_tokens, stop=args.stop,
                      engine_kwargs=engine_kwargs(args, exclude=_NOT_ENGINE_FLAGS), threads=args.threads, log=log,
                      task=task)
    code = exit_code(report, args.max_drop)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    if args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
        if report["failed"]:
            print(f"FAIL: {', '.join(report['failed'])} more than {args.max_drop:g} points below {report['baseline']}")
        else:
            print(f"OK: every configuration within {args.max_drop:g} points of {report['baseline']}")
    return code
