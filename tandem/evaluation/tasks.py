"""Evaluation items: what `tandem eval` asks the model, from a bundled task (addition, counting) or a user's JSONL
file.

Two kinds of item, as in lm-evaluation-harness:
- `GenerationItem` (JSONL `{"prompt", "answer"}`): greedy generation; correct when the output text, stripped
  of surrounding whitespace, equals the answer (stripped too).
- `ChoiceItem` (JSONL `{"prompt", "choices", "label"}`): loglikelihood scoring; the prediction is the choice
  whose continuation tokens have the largest summed logprob after the prompt; correct when it is `label`
  (the index of the right choice).

A row may hold other keys (ignored). Each item is asked in one or both formats: "completion" (the prompt
text as it is) or "chat" (the prompt as one user message, rendered with the tokenizer's chat template)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tandem.errors import ConfigError
from tandem.evaluation.addition import Problem
from tandem.evaluation.counting import CountProblem

FORMAT_CHOICES = ("completion", "chat", "both")


@dataclass(frozen=True)
class GenerationItem:
    format: str  # "completion" or "chat"
    prompt: str  # as given (shown in reports)
    text: str  # what the model reads: the prompt, or the rendered chat
    answer: str

    def is_correct(self, output_text: str) -> bool:
        return (output_text or "").strip() == self.answer.strip()


@dataclass(frozen=True)
class ChoiceItem:
    format: str
    prompt: str
    text: str
    choices: tuple[str, ...]
    label: int


Item = GenerationItem | ChoiceItem


def formats(fmt: str) -> tuple[str, ...]:
    if fmt not in FORMAT_CHOICES:
        raise ConfigError(f"format must be one of {FORMAT_CHOICES}, got {fmt!r}")
    return ("completion", "chat") if fmt == "both" else (fmt,)


def _model_text(prompt: str, kind: str, tokenizer) -> str:
    if kind == "completion":
        return prompt
    from tandem.prompts import render_chat

    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--format chat needs a tokenizer with a chat template")
    return render_chat(tokenizer, [{"role": "user", "content": prompt}])


def addition_items(problems: list[Problem | CountProblem], fmt: str, tokenizer) -> list[GenerationItem]:
    """A bundled task's problems as generation items: "12+345=" (completion) or the user turn "12+345" (and
    "17..21=" / "17..21" for counting)."""
    items = []
    for kind in formats(fmt):
        for p in problems:
            prompt = p.chat_question if kind == "chat" else p.completion_prompt
            items.append(GenerationItem(kind, prompt, _model_text(prompt, kind, tokenizer), p.answer))
    return items


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSONL file, each checked to be a generation or a choice row (ConfigError naming the
    file and line otherwise). Blank lines are skipped."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read --data {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON: {exc}") from None
        rows.append(check_row(row, where))
    if not rows:
        raise ConfigError(f"{path} holds no rows")
    return rows


def check_row(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ConfigError(f"{where}: \"prompt\" must be a non-empty string")
    if "choices" in row:
        choices, label = row["choices"], row.get("label")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ConfigError(f"{where}: \"choices\" must be a list of at least two non-empty strings")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise ConfigError(f"{where}: \"label\" must be the index of the right choice (0..{len(choices) - 1}), "
                              f"got {label!r}")
        return {"prompt": prompt, "choices": list(choices), "label": label}
    answer = row.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise ConfigError(f"{where}: a row needs \"answer\" (exact match) or \"choices\" and \"label\" "
                          f"(loglikelihood scoring)")
    return {"prompt": prompt, "answer": answer}


def data_items(rows: list[dict], fmt: str, tokenizer) -> list[Item]:
    """Rows from `read_jsonl` as items, in each format asked for."""
    items: list[Item] = []
    for kind in formats(fmt):
        for row in rows:
            text = _model_text(row["prompt"], kind, tokenizer)
            if "choices" in row:
                items.append(ChoiceItem(kind, row["prompt"], text, tuple(row["choices"]), row["label"]))
            else:
                items.append(GenerationItem(kind, row["prompt"], text, row["answer"]))
    return items


def continuation_ids(tokenizer, context: str, continuation: str, add_special_tokens: bool) -> tuple[list[int], int]:
    """(token ids of context + continuation, number of them that belong to the context), tokenized as
    lm-evaluation-harness does: whitespace ending the context moves to the continuation, the whole text is
    encoded at once and the context's own encoding says where the continuation starts."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=add_special_tokens)
    context_len = len(tokenizer.encode(context, add_special_tokens=add_special_tokens))
    if not 1 <= context_len < len(whole):
        raise ConfigError(f"cannot split {context!r} + {continuation!r} into context and continuation tokens")
    return whole, context_len
