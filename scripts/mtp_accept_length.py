#!/usr/bin/env python
"""Offline accept length of a model's MTP head with Tandem's NEXTN drafter (`tandem/runtime/mtp_drafter.py`),
on the bundled model's tasks.

For each held-out problem, transformers decodes greedily (the target's own answer) and gives the target's
final hidden states over prompt + answer (teacher forcing; Tandem's equal them within 1e-4). Tandem's drafter,
with the checkpoint's `mtp.*` head, then
- walks the answer as greedy speculative decoding does: a prefill drafts k tokens, each verify step accepts
  the drafts that equal the target's tokens and emits them plus one; `accept_length` is emitted tokens per
  verify step (SGLang's figure, the bonus token included, at most k + 1);
- and, per answer position t (teacher-forced), counts how many of the k chained drafts after t equal the
  target's next tokens (`mean_accepted_drafts_per_position`, at most k).

    python scripts/mtp_accept_length.py [--model-path models/default] [--steps 3] [--limit 100] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tandem.evaluation import heldout_problems  # noqa: E402
from tandem.evaluation.counting import MAX_ANSWER_TOKENS, heldout_count_problems  # noqa: E402
from tandem.layers.forward_batch import ForwardBatch  # noqa: E402
from tandem.layers.span import Span  # noqa: E402
from tandem.loader import load_weights  # noqa: E402
from tandem.models.registry import get_model_class, load_model_config  # noqa: E402
from tandem.parallel.layout import ParallelLayout  # noqa: E402
from tandem.runtime.memory.kv_pool import PagedKVPool  # noqa: E402
from tandem.runtime.mtp_drafter import DraftSpan, MTPDrafter  # noqa: E402

PAGE_SIZE = 16


class Target:
    """transformers' model: greedy answers and the final hidden states (after the final norm)."""

    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._captured = {}
        self.model.model.norm.register_forward_hook(lambda m, i, out: self._captured.__setitem__("h", out))

    @torch.no_grad()
    def answer(self, prompt: str, max_new_tokens: int) -> tuple[list[int], int]:
        ids = self.tokenizer.encode(prompt)
        out = self.model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        return out[0].tolist(), len(ids)

    @torch.no_grad()
    def hidden(self, ids: list[int]) -> torch.Tensor:
        self.model(torch.tensor([ids]))
        return self._captured["h"][0]  # [N, H]


class Drafts:
    """Tandem's drafter over one request at a time, in a pool of the MTP layer alone."""

    def __init__(self, model_dir: str, steps: int):
        config = load_model_config(model_dir)
        self.model = get_model_class(config.architecture)(config, ParallelLayout.single(config.num_layers), mtp=True)
        load_weights(self.model, model_dir, progress=False)
        pages = -(-config.max_position_embeddings // PAGE_SIZE) + 2
        self.pool = PagedKVPool(self.model.mtp.layer_ids, pages, PAGE_SIZE, config.num_kv_heads, config.head_dim,
                                torch.float32, "cpu")
        self.table = list(range(pages))
        self.drafter = MTPDrafter(self.model, steps, PAGE_SIZE, 1 << 20)
        self.steps = steps

    def propose(self, span: Span, ids: list[int], hidden: torch.Tensor, draft: DraftSpan) -> list[int]:
        batch = ForwardBatch.build([span], ids)
        return self.drafter.propose(batch, hidden, ["r"], [self.table], [draft], kv_pool=self.pool)[0]


def matches(drafts: list[int], truth: list[int]) -> int:
    n = 0
    for d, t in zip(drafts, truth):
        if d != t:
            break
        n += 1
    return n


def walk(d: Drafts, y: list[int], n: int, H: torch.Tensor) -> tuple[int, int]:
    """Greedy speculative decoding of y[n:] (ends with EOS): (verify steps, tokens they emitted)."""
    k, N = d.steps, len(y)
    drafts = d.propose(Span(0, 0, n), y[:n], H[:n], DraftSpan(None, y[n]))
    L, steps, emitted = n, 0, 0
    while L < N - 1:  # y[L] is the last token emitted; the target still has y[L + 1 ..] to give
        accepted = matches(drafts, y[L + 1:])
        out = min(accepted + 1, N - 1 - L)
        steps, emitted = steps + 1, emitted + out
        if L + out >= N - 1:
            break
        rows = torch.cat([H[L:L + accepted + 1], H.new_zeros(k - accepted, H.shape[1])])  # rejected rows: unused
        ids = [y[L]] + drafts
        drafts = d.propose(Span(0, L, k + 1), ids, rows, DraftSpan(accepted, y[L + accepted + 1]))
        L += accepted + 1
    return steps, emitted


def per_position(d: Drafts, y: list[int], n: int, H: torch.Tensor) -> list[int]:
    """For each origin t (y[t + 1] known, at least one answer token after it): drafts matching y[t + 2 ..]."""
    counts = []
    for t in range(n - 1, len(y) - 2):
        drafts = d.propose(Span(0, 0, t + 1), y[:t + 1], H[:t + 1], DraftSpan(None, y[t + 1]))
        counts.append(matches(drafts, y[t + 2:]))
    return counts


def measure(target: Target, d: Drafts, prompts: list[str], max_new_tokens: int) -> dict:
    steps = emitted = 0
    counts: list[int] = []
    for prompt in prompts:
        y, n = target.answer(prompt, max_new_tokens)
        H = target.hidden(y)
        s, e = walk(d, y, n, H)
        steps, emitted = steps + s, emitted + e
        counts += per_position(d, y, n, H)
    return {"problems": len(prompts), "verify_steps": steps, "tokens": emitted,
            "accept_length": round(emitted / steps, 4), "num_steps": d.steps,
            "mean_accepted_drafts_per_position": round(sum(counts) / len(counts), 4),
            "positions": len(counts)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=str(ROOT / "models" / "default"))
    parser.add_argument("--steps", type=int, default=3, help="speculative_num_steps: chained drafts")
    parser.add_argument("--limit", type=int, default=100, help="problems per task")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    target, drafts = Target(args.model_path), Drafts(args.model_path, args.steps)
    results = {"model": args.model_path, "counting": measure(
        target, drafts, [p.completion_prompt for p in heldout_count_problems()[:args.limit]], MAX_ANSWER_TOKENS),
        "addition": measure(target, drafts, [p.completion_prompt for p in heldout_problems()[:args.limit]], 8)}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
