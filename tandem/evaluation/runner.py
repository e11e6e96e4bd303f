"""Running evaluation items (`tasks`) through parallel configurations and comparing them with the first.

Each configuration starts its own `Engine` (tp x pp), generates greedily for every generation item (one
batched `generate`) and scores every choice of every choice item (one batched `generate` with
max_new_tokens 0: prompt logprobs only). Per configuration the report holds the accuracy and the agreement
with the first (baseline) configuration: the fraction of items with the same outcome (identical generated
token ids; the same predicted choice), the token agreement over generation items alone, and the largest
difference of a choice's loglikelihood from the baseline's. `check` names the configurations whose
accuracy is more than `max_drop` points below the baseline's."""

from __future__ import annotations

import dataclasses
import time

from tandem.errors import ConfigError
from tandem.evaluation.tasks import ChoiceItem, GenerationItem, Item, continuation_ids


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    name: str
    tp_size: int
    pp_size: int


def generate_all(engine, items: list[GenerationItem], max_new_tokens: int, stop: list[str]) -> list[dict]:
    """Greedy outputs ({"text", "output_ids"}) of the generation items."""
    if not items:
        return []
    ids = [engine.tokenizer.encode(item.text, add_special_tokens=item.format == "completion") for item in items]
    params = {"temperature": 0, "max_new_tokens": max_new_tokens, "stop": list(stop)}
    return [{"text": out["text"], "output_ids": out["output_ids"]}
            for out in engine.generate(input_ids=ids, sampling_params=params)]


def score_all(engine, items: list[ChoiceItem]) -> list[list[float]]:
    """Per choice item, each choice's loglikelihood: the sum of its continuation tokens' logprobs."""
    if not items:
        return []
    seqs, starts = [], []
    for item in items:
        for choice in item.choices:
            whole, context_len = continuation_ids(engine.tokenizer, item.text, choice, item.format == "completion")
            seqs.append(whole)
            starts.append(context_len)
    outs = engine.generate(input_ids=seqs, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                           logprob_start_len=0)
    # input_token_logprobs[k] is the logprob of token k + 1: the continuation starts at index start - 1
    sums = [sum(lp for lp, _ in out["meta_info"]["input_token_logprobs"][start - 1:])
            for out, start in zip(outs, starts)]
    scores, k = [], 0
    for item in items:
        scores.append(sums[k:k + len(item.choices)])
        k += len(item.choices)
    return scores


def run_items(engine, items: list[Item], max_new_tokens: int, stop: list[str] = ()) -> list[dict]:
    """One outcome dict per item, in order (see `evaluate`'s report)."""
    generation = [item for item in items if isinstance(item, GenerationItem)]
    choice = [item for item in items if isinstance(item, ChoiceItem)]
    generated = iter(generate_all(engine, generation, max_new_tokens, list(stop)))
    scored = iter(score_all(engine, choice))
    outcomes = []
    for item in items:
        base = {"format": item.format, "prompt": item.prompt}
        if isinstance(item, GenerationItem):
            out = next(generated)
            outcomes.append({**base, "expected": item.answer, "text": out["text"], "output_ids": out["output_ids"],
                             "correct": item.is_correct(out["text"])})
        else:
            scores = next(scored)
            predicted = max(range(len(scores)), key=lambda i: scores[i])
            outcomes.append({**base, "choices": list(item.choices), "label": item.label, "loglikelihoods": scores,
                             "predicted": predicted, "correct": predicted == item.label})
    return outcomes


def compare(outcomes: list[dict], baseline: list[dict]) -> dict:
    """Agreement of one configuration's outcomes with the baseline's."""
    same = [("output_ids" in a and a["output_ids"] == b["output_ids"]) or
            ("predicted" in a and a["predicted"] == b["predicted"]) for a, b in zip(outcomes, baseline)]
    token_same = [a["output_ids"] == b["output_ids"] for a, b in zip(outcomes, baseline) if "output_ids" in a]
    diffs = [abs(x - y) for a, b in zip(outcomes, baseline) if "loglikelihoods" in a
             for x, y in zip(a["loglikelihoods"], b["loglikelihoods"])]
    return {"agreement": sum(same) / len(same),
            "token_agreement": sum(token_same) / len(token_same) if token_same else None,
            "max_loglikelihood_diff": max(diffs) if diffs else None}


def evaluate(model_path: str, configs: list[ParallelConfig], items: list[Item], max_new_tokens: int,
             stop: list[str] = (), engine_kwargs: dict | None = None, threads: int | None = 1, log=None,
             task: str = "") -> dict:
    """Run every configuration; return {"model_path", "task", "num_items", "baseline", "configs": [...]}, each
    configuration with accuracy, correct, total, accuracy_by_format, agreement, token_agreement,
    max_loglikelihood_diff, seconds and the per-item outputs.

    NOTE: a tp1pp1 engine runs in this process with this process's torch threads, while each rank of a
    multi-process run sets its own (cpu_count // ranks, 1 on a 2-core machine). `threads` (default 1)
    makes the in-process run match, and avoids OpenMP oversubscription on a busy machine."""
    import torch

    from tandem.engine import Engine

    if not items:
        raise ConfigError("nothing to evaluate: no items")
    engine_kwargs = dict(engine_kwargs or {})
    engine_kwargs.setdefault("progress", False)
    results, baseline = [], None
    for cfg in configs:
        start = time.perf_counter()
        saved_threads = torch.get_num_threads()
        if threads and cfg.tp_size * cfg.pp_size == 1:
            torch.set_num_threads(threads)
        try:
            with Engine(model_path, tp_size=cfg.tp_size, pp_size=cfg.pp_size, **engine_kwargs) as engine:
                if engine.tokenizer is None:
                    raise ConfigError(f"{model_path} has no tokenizer; tandem eval needs one")
                outcomes = run_items(engine, items, max_new_tokens, stop)
        finally:
            torch.set_num_threads(saved_threads)
        seconds = time.perf_counter() - start
        baseline = baseline or outcomes
        correct = [o["correct"] for o in outcomes]
        by_format = {}
        for kind in dict.fromkeys(o["format"] for o in outcomes):
            sel = [o["correct"] for o in outcomes if o["format"] == kind]
            by_format[kind] = sum(sel) / len(sel)
        result = {"config": cfg.name, "tp_size": cfg.tp_size, "pp_size": cfg.pp_size,
                  "accuracy": sum(correct) / len(correct), "correct": sum(correct), "total": len(correct),
                  "accuracy_by_format": by_format, **compare(outcomes, baseline), "seconds": round(seconds, 2),
                  "outputs": outcomes}
        results.append(result)
        if log:
            log(f"{cfg.name}: accuracy {result['accuracy']:.3f}, agreement {result['agreement']:.3f} "
                f"({seconds:.1f}s)")
    return {"model_path": model_path, "task": task, "num_items": len(items), "baseline": configs[0].name,
            "configs": results}


def check(report: dict, max_drop: float = 2.0) -> list[str]:
    """Names of the configurations whose accuracy is more than `max_drop` points below the baseline's."""
    base = report["configs"][0]["accuracy"]
    return [r["config"] for r in report["configs"][1:] if (base - r["accuracy"]) * 100 > max_drop + 1e-9]


def format_table(report: dict) -> str:
    rows = [("config", "tp", "pp", "accuracy", "correct", "agreement", "tokens", "max |dLL|", "seconds")]
    for r in report["configs"]:
        tokens = "-" if r["token_agreement"] is None else f"{100 * r['token_agreement']:.1f}%"
        diff = "-" if r["max_loglikelihood_diff"] is None else f"{r['max_loglikelihood_diff']:.2e}"
        rows.append((r["config"], str(r["tp_size"]), str(r["pp_size"]), f"{100 * r['accuracy']:.1f}%",
                     f"{r['correct']}/{r['total']}", f"{100 * r['agreement']:.1f}%", tokens, diff,
                     f"{r['seconds']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    head = f"{report['model_path']}: {report['task']}, {report['num_items']} items, baseline {report['baseline']}"
    return "\n".join([head, *lines])
