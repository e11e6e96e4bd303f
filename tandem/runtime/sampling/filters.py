"""Top-k, min-p and top-p (nucleus) filtering of a batch of probability rows, each row with its own settings.

Each filter becomes a per-row threshold and the row keeps the probabilities at or above it (ties with the
threshold are kept): top-k's threshold is the k-th largest probability, min-p's is min_p times the largest,
top-p's is the smallest probability of the shortest most-likely prefix (of what top-k and min-p left) whose
mass reaches top_p. Top-p looks for that prefix among the NUCLEUS_CANDIDATES most likely tokens first and
sorts the whole vocabulary only when they do not hold enough mass."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tandem.runtime.sampling.params import SamplingParams

NUCLEUS_CANDIDATES = 1024


def filter_probs(probs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Zero, in place, the entries of probs [R, V] that row i's top-k, min-p and top-p (params[i]) exclude."""
    vocab_size = probs.shape[1]
    device = probs.device
    threshold = None
    ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    if min(ks) < vocab_size:
        k = torch.tensor(ks, device=device)[:, None]
        largest = torch.topk(probs, max(k for k in ks if k < vocab_size), dim=-1).values
        kth = largest.gather(1, k.clamp(max=largest.shape[1]) - 1)
        threshold = torch.where(k < vocab_size, kth, 0.0)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=device)[:, None]
        floor = min_p * probs.amax(dim=-1, keepdim=True)
        threshold = floor if threshold is None else torch.maximum(threshold, floor)
    if threshold is not None:
        probs.masked_fill_(probs < threshold, 0.0)
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1]
    if nucleus:
        top_p = torch.tensor([params[i].top_p for i in nucleus], dtype=probs.dtype, device=device)[:, None]
        if len(nucleus) == len(params):
            probs.masked_fill_(probs < nucleus_thresholds(probs, top_p), 0.0)
        else:
            index = torch.tensor(nucleus, device=device)
            rows = probs[index]
            probs[index] = rows.masked_fill_(rows < nucleus_thresholds(rows, top_p), 0.0)
    return probs


def nucleus_thresholds(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[R, 1]: per row, the smallest probability of the shortest most-likely prefix whose share of the row's
    mass reaches top_p [R, 1] (the most likely token always belongs to it)."""
    total = probs.sum(dim=-1, keepdim=True)
    candidates = torch.topk(probs, min(NUCLEUS_CANDIDATES, probs.shape[1]), dim=-1).values  # sorted, descending
    mass_through = torch.cumsum(candidates, dim=-1) / total
    if candidates.shape[1] < probs.shape[1] and not bool((mass_through[:, -1:] >= top_p).all()):
        candidates = torch.sort(probs, dim=-1, descending=True).values
        mass_through = torch.cumsum(candidates, dim=-1) / total
    mass_before = mass_through - candidates / total
    kept = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp(min=1)
    return candidates.gather(1, kept - 1)
