"""Judging drafts (speculative decoding): for each of B requests with k draft tokens, how many the target
accepts and the token that follows them, from the target's scores at the k+1 verified positions (the
request's last token, then each draft). Requests with different k are judged in separate calls.

Greedy (temperature 0): accept drafts while each equals the target's argmax at its position; the first that
differs is replaced by the target's token, or, all accepted, the target's token after the last draft follows.
The tokens are exactly those greedy decoding without drafts produces.

Sampling: the rule of Leviathan et al. / Chen et al. (2023), which keeps the target distribution. With p_i the
target's distribution at position i (after temperature and filters: what the sampler would draw from) and q_i
the distribution the draft d_i was drawn from, d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i));
at the first rejection a token is drawn from the residual max(0, p_i - q_i) (normalised) and the run stops;
when all k are accepted a token is drawn from p_k. Drafts that are deterministic given their context (NGRAM
lookups, an MTP head drafting its argmax) have a point-mass q: accepted with probability p_i(d_i), the residual
is p_i without d_i. Either way each emitted token is distributed as the target's own draw would be."""

from __future__ import annotations

import torch


def accepted_lengths(rejected: torch.Tensor) -> torch.Tensor:
    """rejected [B, k] bool -> [B] int64: the index of each row's first rejection, k where there is none."""
    batch, k = rejected.shape
    none = torch.full((batch,), k, dtype=torch.long, device=rejected.device)
    if k == 0:
        return none
    return torch.where(rejected.any(dim=1), rejected.int().argmax(dim=1), none)  # argmax: the first maximum


def accept_greedy(drafts: torch.Tensor, target_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B requests of k drafts each: drafts [B, k]; target_ids [B, k+1], the target's greedy token at each
    position. Returns (accepted [B]: j, the accepted drafts; next_tokens [B]: the target's token at position
    j); a request emits drafts[:j] then next_tokens."""
    check_shapes(drafts, target_ids.shape)
    accepted = accepted_lengths(drafts != target_ids[:, :-1])
    return accepted, target_ids.gather(1, accepted[:, None]).squeeze(1)


def accept_sampled(drafts: torch.Tensor, target_probs: torch.Tensor, draft_probs: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """B requests of k drafts each: drafts [B, k] int64; target_probs [B, k+1, V] (rows sum to 1); draft_probs
    [B, k, V], the distributions the drafts were drawn from, or None for deterministic drafts (point masses).
    Draws B x k uniforms, then B tokens, from `generator` (requests with their own seeded streams call this
    one by one). Returns (accepted [B], next_tokens [B]) as `accept_greedy` does."""
    check_shapes(drafts, target_probs.shape[:2])
    batch, k = drafts.shape
    p_draft = target_probs[:, :k].gather(2, drafts[..., None]).squeeze(2)  # [B, k]: the target's p of each draft
    if draft_probs is None:
        ratio = p_draft
    else:
        q_draft = draft_probs.gather(2, drafts[..., None]).squeeze(2)
        # a draft its own distribution gives probability 0 cannot have been drawn; accept it only if p does
        ratio = torch.where(q_draft > 0, p_draft / q_draft.clamp_min(torch.finfo(q_draft.dtype).tiny),
                            (p_draft > 0).to(p_draft.dtype))
    uniforms = torch.rand(batch, k, generator=generator, dtype=ratio.dtype, device=ratio.device)
    accepted = accepted_lengths(uniforms >= ratio)
    rows = torch.arange(batch, device=drafts.device)
    last = target_probs[rows, accepted]  # [B, V]: p at the first rejected position, or after the last draft
    rejected = accepted < k
    if rejected.any():
        at = accepted.clamp_max(k - 1)
        q = (torch.nn.functional.one_hot(drafts[rows, at], last.shape[1]).to(last.dtype) if draft_probs is None
             else draft_probs[rows, at])
        leftover = (last - q).clamp_min(0)
        # a rejection has probability 1 - sum min(p, q) > 0 only when the residual has mass; if rounding
        # empties it anyway, the row draws from p itself
        usable = rejected & (leftover.sum(dim=1) > 0)
        last = torch.where(usable[:, None], leftover, last)
    return accepted, torch.multinomial(last, 1, generator=generator).squeeze(1)


def check_shapes(drafts: torch.Tensor, target_shape) -> None:
    if drafts.dim() != 2 or tuple(target_shape) != (drafts.shape[0], drafts.shape[1] + 1):
        raise ValueError(f"drafts of shape {tuple(drafts.shape)} ([requests, k]) need target scores for "
                         f"[requests, k + 1] positions, got {tuple(target_shape)}")
