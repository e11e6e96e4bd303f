"""The last stage's verdict on a step's verify spans (speculative decoding): from the logits at each span's
1 + k positions (the request's last token, then each of its k drafts), the tokens the span emits, judged
by the acceptance rule of `speculative.py`, and their logprobs.

The target distribution at each position is the one the plain sampler would use there: the raw logits,
penalties (from the request's history up to that position: `apply_verify_penalties`), logit_bias and the
structured-output mask of that position (the grammar's state after the drafts before it, filled by the
driver, which sends only drafts the grammar allows), then (sampling) temperature, top-k, min-p and top-p.
A greedy span accepts drafts
while each equals the argmax (`row_argmax`, as the plain sampler breaks ties); a sampled span runs
`accept_sampled` with point-mass drafts (NGRAM lookups and an argmax-drafting MTP head are deterministic).
A seeded span draws from a generator seeded with `draw_seed(seed, n)`, n the tokens generated before the
span's first emitted one, so a run with the same drafts repeats exactly; an unseeded one from
`draw_seed(spec_seed, i)` with the step's `spec_seed` (drawn by the driver), the same on every TP rank of the
last stage: they must agree on what was accepted (the NEXTN drafter runs collectives over the accepted
positions). Logprobs (and top-N lists) are those of the raw distribution at each emitted token's position,
as the plain sampler reports them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tandem.runtime.sampling.argmax import row_argmax
from tandem.runtime.sampling.filters import filter_probs
from tandem.runtime.sampling.logprobs import TopLogprobs, gather_logprobs
from tandem.runtime.sampling.params import SamplingParams
from tandem.runtime.sampling.penalties import TokenHistory, apply_logit_bias, apply_verify_penalties
from tandem.runtime.sampling.sampler import ADJUSTED_LOGITS_ERROR, DISTRIBUTION_ERROR, RAW_LOGITS_ERROR, draw_seed
from tandem.runtime.sampling.speculative import accept_greedy, accept_sampled


@dataclass
class Verdict:
    """One verify span's outcome: the tokens it emits (accepted drafts, then the target's token) and their
    logprobs (None where not wanted), or the error that ends its request."""

    tokens: list[int] | None
    logprobs: list[float | None] | None
    error: str | None = None
    top_logprobs: list[TopLogprobs | None] | None = None  # per emitted token, with top_logprobs_num > 0


def judge_spans(logits: torch.Tensor, drafts: Sequence[list[int]], params: Sequence[SamplingParams],
                num_generated: Sequence[int], want_logprobs: Sequence[bool],
                generator: Callable[[torch.device], torch.Generator], step_seed: int | None = None,
                top_nums: Sequence[int] | None = None, histories: Sequence[TokenHistory] | None = None,
                masks: Sequence[torch.Tensor | None] | None = None) -> list[Verdict]:
    """logits [sum(1 + k_i), V]: span i's rows in order, then span i + 1's. `num_generated[i]`: tokens span
    i's request generated before the first token this span emits (its seeded draw's index). `generator(device)`
    gives the generator sampled spans reseed; `step_seed` seeds the unseeded ones (default: 0). `top_nums[i]`:
    top-N logprobs per emitted token; `histories[i]`: span i's sampler history, which has observed the span's
    tokens (needed with penalties)."""
    logits = logits.float()
    sizes = [len(d) + 1 for d in drafts]
    top_nums = top_nums or [0] * len(drafts)
    raw_ok = logits.amax(dim=-1).isfinite()
    adjusted, bias_errors = _adjust(logits, drafts, params, histories, masks)
    adjusted_ok = adjusted.amax(dim=-1).isfinite() if adjusted is not logits else raw_ok
    verdicts, start = [], 0
    for i, (span_drafts, p, n) in enumerate(zip(drafts, params, sizes)):
        rows = slice(start, start + n)
        start += n
        error = next((e for e in bias_errors[rows] if e), None)
        if not bool(raw_ok[rows].all()):
            error = RAW_LOGITS_ERROR
        elif error is None and not bool(adjusted_ok[rows].all()):
            error = ADJUSTED_LOGITS_ERROR
        if error is not None:
            verdicts.append(Verdict(None, None, error))
            continue
        seed = draw_seed(p.seed, num_generated[i]) if p.seed is not None else draw_seed(step_seed or 0, i)
        verdict = _judge(adjusted[rows], span_drafts, p, seed, generator)
        if verdict.error is None and (want_logprobs[i] or top_nums[i] > 0):
            tokens = torch.tensor(verdict.tokens, device=logits.device)
            verdict.logprobs, tops = gather_logprobs(torch.log_softmax(logits[rows][:len(tokens)], dim=-1),
                                                     tokens, [top_nums[i]] * len(tokens))
            verdict.top_logprobs = tops if top_nums[i] > 0 else None
        verdicts.append(verdict)
    return verdicts


def _adjust(logits: torch.Tensor, drafts: Sequence[list[int]], params: Sequence[SamplingParams],
            histories: Sequence[TokenHistory] | None,
            masks: Sequence[torch.Tensor | None] | None) -> tuple[torch.Tensor, list[str | None]]:
    """The verify rows' logits after penalties, logit_bias and the grammar masks (`logits` itself when none
    applies), and each row's logit_bias error."""
    row_params = [p for p, d in zip(params, drafts) for _ in range(len(d) + 1)]
    penalized = any(p.uses_penalties for p in params)
    masked = masks is not None and any(m is not None for m in masks)
    if not (penalized or masked or any(p.logit_bias for p in params)):
        return logits, [None] * len(row_params)
    adjusted = logits.clone()
    if penalized:
        if histories is None:
            raise ValueError("verify spans with penalties need their requests' token histories")
        apply_verify_penalties(adjusted, histories, params, drafts)
    errors = apply_logit_bias(adjusted, row_params)
    if masked:
        start = 0
        for span_drafts, mask in zip(drafts, masks):
            rows = slice(start, start + len(span_drafts) + 1)
            start = rows.stop
            if mask is not None:
                adjusted[rows] = adjusted[rows].masked_fill(~mask, float("-inf"))
    return adjusted, errors


def _judge(adjusted: torch.Tensor, drafts: list[int], p: SamplingParams, seed: int,
           generator: Callable[[torch.device], torch.Generator]) -> Verdict:
    """One span: adjusted logits [1 + k, V] -> the emitted tokens."""
    device = adjusted.device
    draft_ids = torch.tensor([drafts], dtype=torch.long, device=device)  # [1, k]
    if p.greedy:
        accepted, bonus = accept_greedy(draft_ids, row_argmax(adjusted)[None])
    else:
        probs = filter_probs(torch.softmax(adjusted / p.temperature, dim=-1), [p] * adjusted.shape[0])
        mass = probs.sum(dim=-1)
        if not bool((mass.isfinite() & (mass > 0)).all()):
            return Verdict(None, None, DISTRIBUTION_ERROR)
        probs = probs / mass[:, None]
        gen = generator(device)
        gen.manual_seed(seed)
        accepted, bonus = accept_sampled(draft_ids, probs[None], None, generator=gen)
    j = int(accepted[0])
    return Verdict(drafts[:j] + [int(bonus[0])], [None] * (j + 1))
