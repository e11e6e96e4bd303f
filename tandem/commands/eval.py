"""`tandem eval`: the pipeline accuracy check. Runs the default model's held-out addition problems
(`tandem.evaluation`) through several parallel configurations with greedy decoding and reports, per
configuration, the exact-match accuracy and the agreement with the first (baseline) configuration: the
fraction of problems whose generated token ids are identical. Exits 1 when a configuration's accuracy
is more than `--max-drop` points below the baseline's.

    tandem eval --model-path models/default --configs pp1,pp2,pp4,tp2,tp2pp2 [--limit N] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time

from tandem.commands.engine_flags import add_engine_flags, engine_kwargs
from tandem.errors import ConfigError

# Engine settings that `--configs` decides, that only make sense for one configuration, or (the model
# path) that eval defines with a default of its own.
_NOT_ENGINE_FLAGS = ("model_path", "tp_size", "pp_size", "pp_layer_partition", "nnodes", "node_rank",
                     "dist_init_addr")
_CONFIG_RE = re.compile(r"(?:tp(\d+))?(?:pp(\d+))?")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    name: str
    tp_size: int
    pp_size: int


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
        description="Run the default model's held-out addition problems through each configuration "
                    "(greedy) and compare accuracy and generated tokens with the first configuration.")
    parser.add_argument("--model-path", default=None,
                        help="Checkpoint directory (default: models/default, the bundled model).")
    parser.add_argument("--configs", default="pp1,pp2",
                        help="Comma-separated configurations tpXppY, the first is the baseline (default: pp1,pp2).")
    parser.add_argument("--limit", type=int, default=None, help="Evaluate only the first N held-out problems.")
    parser.add_argument("--format", choices=("completion", "chat", "both"), default="completion",
                        help="Prompt form: raw 'a+b=' completion, ChatML chat turn, or both (default: completion).")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="Tokens to generate per problem.")
    parser.add_argument("--max-drop", type=float, default=2.0,
                        help="Fail when accuracy is more than this many points below the baseline (default: 2).")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON instead of a table.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the in-process (tp1pp1) engine; 1 (default) does each step's "
                             "arithmetic the way a one-thread rank of a multi-process run does.")
    add_engine_flags(parser, exclude=_NOT_ENGINE_FLAGS)
    parser.set_defaults(run=run)


def build_prompts(problems, fmt: str, tokenizer) -> list[tuple[str, object, str]]:
    """[(format, problem, prompt text)] for the chosen format(s)."""
    from tandem.prompts import render_chat

    items = []
    for kind in (("completion", "chat") if fmt == "both" else (fmt,)):
        for p in problems:
            if kind == "chat":
                if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                    raise ConfigError("--format chat needs a tokenizer with a chat template")
                text = render_chat(tokenizer, p.chat_messages())
            else:
                text = p.completion_prompt
            items.append((kind, p, text))
    return items


def evaluate(model_path: str, configs: list[ParallelConfig], limit: int | None = None, fmt: str = "completion",
             max_new_tokens: int | None = None, engine_kwargs: dict | None = None, threads: int | None = 1,
             log=None) -> dict:
    """Run every configuration; return {"configs": [...], "baseline": name, "num_problems": n}.

    NOTE: a tp1pp1 engine runs in this process with this process's torch threads, while each rank of a
    multi-process run sets its own (cpu_count // ranks, 1 on a 2-core machine). `threads` (default 1)
    makes the in-process run match, and avoids OpenMP oversubscription on a busy machine."""
    import torch

    from tandem.engine import Engine, load_tokenizer
    from tandem.evaluation import MAX_ANSWER_TOKENS, heldout_problems, is_correct

    problems = heldout_problems()
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {limit}")
        problems = problems[:limit]
    items = build_prompts(problems, fmt, load_tokenizer(model_path))
    params = {"temperature": 0, "max_new_tokens": max_new_tokens or MAX_ANSWER_TOKENS}
    engine_kwargs = dict(engine_kwargs or {})
    engine_kwargs.setdefault("progress", False)
    results, baseline_ids = [], None
    for cfg in configs:
        start = time.perf_counter()
        saved_threads = torch.get_num_threads()
        if threads and cfg.tp_size * cfg.pp_size == 1:
            torch.set_num_threads(threads)
        try:
            with Engine(model_path, tp_size=cfg.tp_size, pp_size=cfg.pp_size, **engine_kwargs) as engine:
                if engine.tokenizer is None:
                    raise ConfigError(f"{model_path} has no tokenizer; tandem eval needs one")
                outs = engine.generate(prompt=[text for _, _, text in items], sampling_params=params)
        finally:
            torch.set_num_threads(saved_threads)
        seconds = time.perf_counter() - start
        correct = [is_correct(out["text"], p) for (_, p, _), out in zip(items, outs)]
        ids = [out["output_ids"] for out in outs]
        if baseline_ids is None:
            baseline_ids = ids
        agree = sum(a == b for a, b in zip(ids, baseline_ids)) / len(ids)
        by_format = {}
        for kind in dict.fromkeys(k for k, _, _ in items):
            sel = [c for (k, _, _), c in zip(items, correct) if k == kind]
            by_format[kind] = sum(sel) / len(sel)
        result = {"config": cfg.name, "tp_size": cfg.tp_size, "pp_size": cfg.pp_size,
                  "accuracy": sum(correct) / len(correct), "correct": sum(correct), "total": len(correct),
                  "accuracy_by_format": by_format, "agreement": agree, "seconds": round(seconds, 2),
                  "outputs": [{"format": k, "prompt": p.chat_question if k == "chat" else p.completion_prompt,
                               "expected": p.answer, "text": out["text"], "output_ids": out["output_ids"],
                               "correct": c}
                              for (k, p, _), out, c in zip(items, outs, correct)]}
        results.append(result)
        if log:
            log(f"{cfg.name}: accuracy {result['accuracy']:.3f}, agreement {agree:.3f} ({seconds:.1f}s)")
    return {"model_path": model_path, "num_problems": len(problems), "format": fmt, "baseline": configs[0].name,
            "configs": results}


def check(report: dict, max_drop: float = 2.0) -> list[str]:
    """Names of the configurations whose accuracy is more than `max_drop` points below the baseline's."""
    base = report["configs"][0]["accuracy"]
    return [r["config"] for r in report["configs"][1:] if (base - r["accuracy"]) * 100 > max_drop + 1e-9]


def format_table(report: dict) -> str:
    rows = [("config", "tp", "pp", "accuracy", "correct", "agreement", "seconds")]
    for r in report["configs"]:
        rows.append((r["config"], str(r["tp_size"]), str(r["pp_size"]), f"{100 * r['accuracy']:.1f}%",
                     f"{r['correct']}/{r['total']}", f"{100 * r['agreement']:.1f}%", f"{r['seconds']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    head = (f"{report['model_path']}: {report['num_problems']} held-out problems, format {report['format']}, "
            f"baseline {report['baseline']}")
    return "\n".join([head, *lines])


def default_model_path() -> str:
    """models/default of the current directory, else the one next to the tandem package (a checkout)."""
    from pathlib import Path

    local = Path("models/default")
    if local.is_dir():
        return str(local)
    return str(Path(__file__).resolve().parents[2] / "models" / "default")


def run(args: argparse.Namespace) -> int:
    configs = parse_configs(args.configs)
    model_path = args.model_path or default_model_path()
    log = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    report = evaluate(model_path, configs, limit=args.limit, fmt=args.format, max_new_tokens=args.max_new_tokens,
                      engine_kwargs=engine_kwargs(args, exclude=_NOT_ENGINE_FLAGS), threads=args.threads, log=log)
    failed = check(report, args.max_drop)
    report["failed"] = failed
    report["passed"] = not failed
    if args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
        if failed:
            print(f"FAIL: {', '.join(failed)} more than {args.max_drop:g} points below {report['baseline']}")
        else:
            print(f"OK: every configuration within {args.max_drop:g} points of {report['baseline']}")
    return 1 if failed else 0
