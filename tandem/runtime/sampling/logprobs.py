"""Logprobs as reported to clients: of the model's raw distribution (log_softmax of the raw logits, before
penalties, logit_bias, temperature and filters), for chosen tokens and as top-N (token id, logprob) lists.
One log_softmax and at most one topk (with the largest N asked for) per call, whatever the number of rows
(`grouped_token_logprobs` scores the prompt rows of every request of a step in one call)."""

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


PROMPT_LOGITS_ERROR = "the model produced NaN or Inf logits for the prompt"


def token_logprobs(logits: torch.Tensor, target_ids: Sequence[int] | torch.Tensor, top_n: int = 0) -> TokenLogprobs:
    """logits [T, V] of a chunk's positions, target_ids [T] (the token that follows each position):
    each target's logprob under the raw distribution, and with top_n > 0 the top-N pairs per position."""
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}")
    return grouped_token_logprobs(logits, target_ids, [len(target_ids)], [top_n])[0]


def grouped_token_logprobs(logits: torch.Tensor, target_ids: Sequence[int] | torch.Tensor, sizes: Sequence[int],
                           top_nums: Sequence[int]) -> list[TokenLogprobs]:
    """`token_logprobs` for several groups of rows at once (one log_softmax and at most one topk for all):
    group g is the next sizes[g] rows of logits [T, V] and target_ids [T], with top_nums[g] pairs per row.
    A group whose logits are not finite gets an error (and empty lists) alone."""
    targets = torch.as_tensor(target_ids, dtype=torch.long)
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(f"logits must be [T, V] and target_ids [T]; got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if len(sizes) != len(top_nums) or any(n < 0 for n in sizes) or sum(sizes) != len(targets):
        raise ValueError(f"group sizes {list(sizes)} must be non-negative and add up to {len(targets)} rows, "
                         f"one top_n each")
    if any(n < 0 for n in top_nums):
        raise ValueError(f"top_n must be >= 0, got {list(top_nums)}")
    if len(targets) and not (0 <= int(targets.min()) and int(targets.max()) < logits.shape[1]):
        raise ValueError(f"target ids must be in [0, {logits.shape[1]})")
    logits = logits.float()
    row_ok = torch.isfinite(logits).all(dim=-1).tolist()
    row_tops = [n for n, size in zip(top_nums, sizes) for _ in range(size)]
    chosen, tops = gather_logprobs(torch.log_softmax(logits, dim=-1), targets, row_tops)
    groups, start = [], 0
    for size, top_n in zip(sizes, top_nums):
        end = start + size
        if not all(row_ok[start:end]):
            groups.append(TokenLogprobs([], None, PROMPT_LOGITS_ERROR))
        else:
            groups.append(TokenLogprobs(chosen[start:end], tops[start:end] if top_n > 0 else None))
        start = end
    return groups
