"""The sampler: per-request token history, then one batched pass over a step's [B, V] logits —
penalties and logit_bias, greedy argmax or temperature + top-k + min-p + top-p sampling, reported logprobs —
with numeric failures confined to the row they happen in.

Protocol (per request key, on the rank that samples):
  begin(key, params, prompt_len)   when the request's cache starts at position 0 (again, after preemption
                                   or a restart: the history is rebuilt from what is fed through the model);
  observe(key, token_ids, start)   for the tokens of each step, before that step's sample();
  sample(logits, params, keys)     for the rows that sample a token;
  release(key)                     when the request ends.

Seeded rows draw their token number n (0 = the first generated token) with a generator seeded from
(seed, n) alone, so the stream depends only on the seed and on how many tokens were generated: a request
re-prefilled from prompt + generated tokens continues exactly where it was. Unseeded rows use the device's
default generator. Generators live on the device of the logits."""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from tandem.runtime.logprobs import TopLogprobs, gather_logprobs
from tandem.runtime.penalties import TokenHistory, apply_logit_bias, apply_penalties
from tandem.runtime.sampling_params import SamplingParams

__all__ = ["SampleResult", "Sampler", "SamplingParams", "draw_seed"]

RAW_LOGITS_ERROR = "the model produced NaN or Inf logits for this request"
ADJUSTED_LOGITS_ERROR = "the logits became NaN or +Inf (or all -Inf) after penalties and logit_bias"
DISTRIBUTION_ERROR = "the sampling distribution became invalid (NaN, Inf or all zero) after temperature and filters"


def draw_seed(seed: int, index: int) -> int:
    """The generator seed for draw number `index` of a request seeded with `seed` (both in [0, 2**63)):
    the first 8 bytes of BLAKE2b over their big-endian bytes, shifted right by one bit."""
    digest = hashlib.blake2b(seed.to_bytes(8, "big") + index.to_bytes(8, "big"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass
class SampleResult:
    """Per row of the sampled logits; a row with an error has token, logprob and top_logprobs None."""
    tokens: list[int | None]
    logprobs: list[float | None]  # of the chosen token under the raw distribution (log_softmax of raw logits)
    top_logprobs: list[TopLogprobs | None]  # top-N (token id, logprob), raw distribution; None where N == 0
    errors: list[str | None]  # why the row has no token; None where it has one


class Sampler:
    def __init__(self):
        self.histories: dict[Hashable, TokenHistory] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    # ---- per-request history ---------------------------------------------------------------------------
    def begin(self, key: Hashable, params: SamplingParams, prompt_len: int, prefix_ids: Sequence[int] = ()) -> None:
        """Start (or restart) a request whose cache starts empty; `prefix_ids` are tokens at positions
        0, 1, ... that will not be fed through the model (a reused cached prefix), if any."""
        self.histories[key] = TokenHistory(prompt_len, count_tokens=params.uses_penalties)
        if len(prefix_ids):
            self.histories[key].observe(prefix_ids, 0)

    def observe(self, key: Hashable, token_ids: Sequence[int], start_position: int) -> None:
        """Tokens of `key` fed through the model in this step, starting at `start_position`; positions at or
        past the request's prompt_len count as generated output."""
        self._history(key).observe(token_ids, start_position)

    def release(self, key: Hashable) -> None:
        self.histories.pop(key, None)

    def _history(self, key: Hashable) -> TokenHistory:
        history = self.histories.get(key)
        if history is None:
            raise LookupError(f"request {key!r} has no history in the sampler: begin() was not called for it")
        return history

    # ---- sampling --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams], keys: Sequence[Hashable],
               top_logprobs_num: Sequence[int] | None = None) -> SampleResult:
        """logits [B, V]: row i is the next-token logits of request keys[i] with params[i]; row i also
        reports the top top_logprobs_num[i] alternatives (default: none)."""
        batch = logits.shape[0]
        if not len(params) == len(keys) == batch:
            raise ValueError(f"{batch} rows of logits, {len(params)} params, {len(keys)} keys")
        top_nums = list(top_logprobs_num) if top_logprobs_num is not None else [0] * batch
        if len(top_nums) != batch or any(n < 0 for n in top_nums):
            raise ValueError(f"top_logprobs_num must hold {batch} non-negative integers, got {top_nums}")
        histories = [self._history(key) for key in keys]
        for key, p, history in zip(keys, params, histories):
            if p.uses_penalties and not history.count_tokens:
                raise ValueError(f"request {key!r} uses penalties but was begun with params that did not")
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1)

        raw_ok = torch.isfinite(logits).all(dim=-1)
        adjusted = logits.clone()  # rows with non-finite values fail the check below and are zeroed there
        apply_penalties(adjusted, histories, params)
        bias_errors = apply_logit_bias(adjusted, params)
        adjusted_ok = ~(adjusted.isnan() | (adjusted == torch.inf)).any(dim=-1) & (adjusted > -torch.inf).any(dim=-1)
        adjusted = torch.where(adjusted_ok[:, None], adjusted, 0.0)  # failed rows must not disturb the draws

        tokens = adjusted.argmax(dim=-1)
        distribution_ok = torch.ones(batch, dtype=torch.bool, device=logits.device)
        sampled = [row for row, p in enumerate(params) if not p.greedy]
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            chosen, valid = self._sample_rows(adjusted[rows], [params[r] for r in sampled],
                                              [histories[r] for r in sampled])
            tokens[rows] = chosen
            distribution_ok[rows] = valid

        ok_flags = torch.stack([raw_ok, adjusted_ok, distribution_ok]).tolist()
        chosen_logprobs, tops = gather_logprobs(raw_logprobs, tokens, top_nums)
        token_list = tokens.tolist()
        errors: list[str | None] = []
        for row in range(batch):
            if not ok_flags[0][row]:
                errors.append(RAW_LOGITS_ERROR)
            elif bias_errors[row]:
                errors.append(bias_errors[row])
            elif not ok_flags[1][row]:
                errors.append(ADJUSTED_LOGITS_ERROR)
            elif not ok_flags[2][row]:
                errors.append(DISTRIBUTION_ERROR)
            else:
                errors.append(None)
        failed = [e is not None for e in errors]
        return SampleResult(
            tokens=[None if bad else t for t, bad in zip(token_list, failed)],
            logprobs=[None if bad else lp for lp, bad in zip(chosen_logprobs, failed)],
            top_logprobs=[None if bad else top for top, bad in zip(tops, failed)],
            errors=errors)

    def _sample_rows(self, logits: torch.Tensor, params: list[SamplingParams],
                     histories: list[TokenHistory]) -> tuple[torch.Tensor, torch.Tensor]:
        """Temperature, filters and a draw for non-greedy rows. Returns (tokens, valid) per row."""
        device = logits.device
        temperatures = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
        probs = filter_probs(torch.softmax(logits / temperatures[:, None], dim=-1), params)
        valid = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)
        probs = torch.where(valid[:, None], probs, 1.0)  # an invalid row draws from uniform; its token is dropped
        tokens = torch.empty(len(params), dtype=torch.long, device=device)
        unseeded = [i for i, p in enumerate(params) if p.seed is None]
        if unseeded:
            index = torch.tensor(unseeded, device=device)
            tokens[index] = torch.multinomial(probs[index], 1).squeeze(1)
        generator = None
        for i, (p, history) in enumerate(zip(params, histories)):
            if p.seed is None:
                continue
            if generator is None:
                generator = self._generator(device)
            generator.manual_seed(draw_seed(p.seed, history.num_generated))
            tokens[i] = torch.multinomial(probs[i], 1, generator=generator)[0]
        return tokens, valid

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        return generator


def filter_probs(probs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Zero the probabilities that top-k, min-p and top-p (in that order) exclude, row i by params[i]:
    top-k keeps those >= the k-th largest; min-p keeps those >= min_p * the largest; top-p keeps the
    smallest most-likely prefix of what is left whose mass reaches top_p (always the most likely token)."""
    vocab_size = probs.shape[1]
    device = probs.device
    keep = torch.ones_like(probs, dtype=torch.bool)
    ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    if min(ks) < vocab_size:
        kth_values = torch.topk(probs, max(k for k in ks if k < vocab_size), dim=-1).values
        k = torch.tensor(ks, device=device)
        kth = kth_values.gather(1, (k.clamp(max=kth_values.shape[1]) - 1)[:, None])
        keep &= (probs >= kth) | (k[:, None] == vocab_size)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=device)
        keep &= probs >= min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    probs = torch.where(keep, probs, 0.0)
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1]
    if nucleus:
        index = torch.tensor(nucleus, device=device)
        top_p = torch.tensor([params[i].top_p for i in nucleus], dtype=probs.dtype, device=device)
        sorted_probs, order = torch.sort(probs[index], dim=-1, descending=True)
        mass_before = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) / sorted_probs.sum(dim=-1, keepdim=True)
        sorted_probs = torch.where(mass_before >= top_p[:, None], 0.0, sorted_probs)
        probs[index] = torch.zeros_like(sorted_probs).scatter(1, order, sorted_probs)
    return probs
