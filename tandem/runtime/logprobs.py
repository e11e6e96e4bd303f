"""Logprobs as reported to clients: of the model's raw distribution (log_softmax of the raw logits, before
penalties, logit_bias, temperature and filters), for chosen tokens and as top-N (token id, logprob) lists.
One log_softmax and at most one topk (with the largest N asked for) per call, whatever the number of rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

TopLogprobs = list[tuple[int, float]]  # (token id, logprob), most likely first


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor,
                    top_nums: Sequence[int]) -> tuple[list[float], list[TopLogprobs | None]]:
    """From log-probabilities [R, V]: the logprob of token_ids[r] in row r, and row r's top top_nums[r]
    (token id, logprob) pairs (None where top_nums[r] == 0)."""
    chosen = logprobs.gather(1, token_ids.to(logprobs.device)[:, None]).squeeze(1).tolist()
    most = min(max(top_nums, default=0), logprobs.shape[1])
    if most <= 0:
        return chosen, [None] * len(chosen)
    top = torch.topk(logprobs, most, dim=-1)
    values, indices = top.values.tolist(), top.indices.tolist()
    tops = [list(zip(indices[r][:n], values[r][:n])) if n > 0 else None for r, n in enumerate(top_nums)]
    return chosen, tops


@dataclass
class TokenLogprobs:
    """Logprobs of given target tokens (prompt scoring, `echo`, input_token_logprobs)."""
    logprobs: list[float]  # per position: logprob of its target token
    top_logprobs: list[TopLogprobs] | None  # per position: top-N pairs; None when top_n == 0
    error: str | None = None  # set (and the lists empty) when the logits are not finite


def token_logprobs(logits: torch.Tensor, target_ids: Sequence[int] | torch.Tensor, top_n: int = 0) -> TokenLogprobs:
    """logits [T, V] of a chunk's positions, target_ids [T] (the token that follows each position):
    each target's logprob under the raw distribution, and with top_n > 0 the top-N pairs per position."""
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}")
    targets = torch.as_tensor(target_ids, dtype=torch.long)
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(f"logits must be [T, V] and target_ids [T]; got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if len(targets) and not (0 <= int(targets.min()) and int(targets.max()) < logits.shape[1]):
        raise ValueError(f"target ids must be in [0, {logits.shape[1]})")
    logits = logits.float()
    if not bool(torch.isfinite(logits).all()):
        return TokenLogprobs([], None, "the model produced NaN or Inf logits for the prompt")
    chosen, tops = gather_logprobs(torch.log_softmax(logits, dim=-1), targets, [top_n] * len(targets))
    return TokenLogprobs(chosen, tops if top_n > 0 else None)
