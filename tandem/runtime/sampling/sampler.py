"""The sampler: per-request token history, then one batched pass over a step's [B, V] logits —
penalties and logit_bias, the structured-output token mask, greedy argmax or temperature + top-k + min-p +
top-p sampling, reported logprobs — with numeric failures confined to the row they happen in.

Protocol (per request key, on the rank that samples):
  begin(key, params, prompt_len)   when the request's cache starts at position 0 (again, after preemption
                                   or a restart: the history is rebuilt from what is fed through the model);
  observe(key, token_ids, start)   for the tokens of each step, before that step's sample();
  sample(logits, params, keys)     for the rows that sample a token (with `want_logprobs`, only the rows
                                   that report logprobs pay for the full-vocabulary log_softmax);
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

from tandem.runtime.sampling.argmax import row_argmax
from tandem.runtime.sampling.filters import filter_probs
from tandem.runtime.sampling.logprobs import TopLogprobs, gather_logprobs
from tandem.runtime.sampling.params import SamplingParams
from tandem.runtime.sampling.penalties import TokenHistory, apply_logit_bias, apply_penalties
from tandem.runtime.sampling.token_mask import TokenMask, apply_token_mask

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
    # of the chosen token under the raw distribution (log_softmax of raw logits); None where not wanted
    logprobs: list[float | None]
    top_logprobs: list[TopLogprobs | None]  # top-N (token id, logprob), raw distribution; None where N == 0
    errors: list[str | None]  # why the row has no token; None where it has one


class Sampler:
    def __init__(self):
        self.histories: dict[Hashable, TokenHistory] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    # ---- per-request history ---------------------------------------------------------------------------
    def begin(self, key: Hashable, params: SamplingParams, prompt_len: int, prefix_ids: Sequence[int] = (),
              start_position: int = 0) -> None:
        """Start (or restart) a request; `prefix_ids` are tokens at positions 0, 1, ... that will not be fed
        through the model (a reused cached prefix), if any. A request that uses no penalty may instead give
        only where its first fed token sits (`start_position`): its history then needs no tokens."""
        history = self.histories[key] = TokenHistory(prompt_len, count_tokens=params.uses_penalties)
        if len(prefix_ids):
            history.observe(prefix_ids, 0)
        elif start_position:
            history.skip_to(start_position)

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
               top_logprobs_num: Sequence[int] | None = None,
               want_logprobs: Sequence[bool] | None = None, token_mask: TokenMask | None = None) -> SampleResult:
        """logits [B, V]: row i is the next-token logits of request keys[i] with params[i]; row i also
        reports the top top_logprobs_num[i] alternatives (default: none), and the chosen token's logprob
        where want_logprobs[i] or top_logprobs_num[i] > 0 (default: every row). `token_mask` (structured
        output) limits its rows to their allowed tokens, after penalties and logit_bias."""
        top_nums, wants = _logprob_requests(logits.shape[0], params, keys, top_logprobs_num, want_logprobs)
        histories = [self._history(key) for key in keys]
        for key, p, history in zip(keys, params, histories):
            if p.uses_penalties and not history.count_tokens:
                raise ValueError(f"request {key!r} uses penalties but was begun with params that did not")
        logits = logits.float()
        # a row's logsumexp is finite exactly when its maximum is: no NaN, no +Inf, not all -Inf
        raw_ok = logits.amax(dim=-1).isfinite()
        adjusted, adjusted_ok, bias_errors = _adjust(logits, params, histories)
        if token_mask is not None:
            adjusted = apply_token_mask(adjusted, logits, token_mask)
            index = torch.tensor(token_mask.rows, device=logits.device)
            adjusted_ok[index] = adjusted[index].amax(dim=-1).isfinite()
        tokens, distribution_ok = self._choose(adjusted, params, histories)
        ok_flags = torch.stack([raw_ok, adjusted_ok, distribution_ok]).tolist()
        chosen_logprobs, tops = self._logprobs(logits, tokens, top_nums, wants)
        errors = [_row_error(raw, bias, adj, dist) for raw, bias, adj, dist in zip(ok_flags[0], bias_errors,
                                                                                   ok_flags[1], ok_flags[2])]
        failed = [e is not None for e in errors]
        return SampleResult(
            tokens=[None if bad else t for t, bad in zip(tokens.tolist(), failed)],
            logprobs=[None if bad else lp for lp, bad in zip(chosen_logprobs, failed)],
            top_logprobs=[None if bad else top for top, bad in zip(tops, failed)],
            errors=errors)

    def _choose(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                histories: list[TokenHistory]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's token: greedy rows by argmax, the others drawn (`_sample_rows`); and whether each row's
        distribution was valid (greedy rows always are)."""
        sampled = [row for row, p in enumerate(params) if not p.greedy]
        if len(sampled) == len(params):
            return self._sample_rows(logits, list(params), histories)
        tokens, valid = row_argmax(logits), torch.ones(len(params), dtype=torch.bool, device=logits.device)
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            tokens[index], valid[index] = self._sample_rows(logits[index], [params[r] for r in sampled],
                                                            [histories[r] for r in sampled])
        return tokens, valid

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_nums: list[int],
                  wants: list[bool]) -> tuple[list[float | None], list[TopLogprobs | None]]:
        """The chosen tokens' raw logprobs and top-N lists of the rows that want them (one log_softmax over
        those rows only); None for the others."""
        rows = [row for row, want in enumerate(wants) if want]
        if len(rows) == len(wants):
            return gather_logprobs(torch.log_softmax(logits, dim=-1), tokens, top_nums)
        chosen: list[float | None] = [None] * len(wants)
        tops: list[TopLogprobs | None] = [None] * len(wants)
        if rows:
            index = torch.tensor(rows, device=logits.device)
            some_chosen, some_tops = gather_logprobs(torch.log_softmax(logits[index], dim=-1), tokens[index],
                                                     [top_nums[row] for row in rows])
            for row, lp, top in zip(rows, some_chosen, some_tops):
                chosen[row], tops[row] = lp, top
        return chosen, tops

    def _sample_rows(self, logits: torch.Tensor, params: list[SamplingParams],
                     histories: list[TokenHistory]) -> tuple[torch.Tensor, torch.Tensor]:
        """Temperature, filters and a draw for non-greedy rows. Returns (tokens, valid) per row."""
        device = logits.device
        temperatures = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
        probs = filter_probs(torch.softmax(logits / temperatures[:, None], dim=-1), params)
        mass = probs.sum(dim=-1)
        valid = mass.isfinite() & (mass > 0)
        probs.masked_fill_(~valid[:, None], 1.0)  # an invalid row draws from uniform (its token is dropped)
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
                generator = self.generator(device)
            generator.manual_seed(draw_seed(p.seed, history.num_generated))
            tokens[i] = torch.multinomial(probs[i], 1, generator=generator)[0]
        return tokens, valid

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator seeded rows on `device` reseed before each draw (one per device, reused)."""
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        return generator


def _logprob_requests(batch: int, params: Sequence[SamplingParams], keys: Sequence[Hashable],
                      top_logprobs_num: Sequence[int] | None,
                      want_logprobs: Sequence[bool] | None) -> tuple[list[int], list[bool]]:
    """Validated per-row top-N counts and whether each row reports logprobs (top-N > 0 implies it)."""
    if not len(params) == len(keys) == batch:
        raise ValueError(f"{batch} rows of logits, {len(params)} params, {len(keys)} keys")
    top_nums = list(top_logprobs_num) if top_logprobs_num is not None else [0] * batch
    if len(top_nums) != batch or any(n < 0 for n in top_nums):
        raise ValueError(f"top_logprobs_num must hold {batch} non-negative integers, got {top_nums}")
    wants = [True] * batch if want_logprobs is None else [bool(w) or n > 0 for w, n in zip(want_logprobs, top_nums)]
    if len(wants) != batch:
        raise ValueError(f"want_logprobs must hold {batch} flags, got {len(wants)}")
    return top_nums, wants


def _adjust(logits: torch.Tensor, params: Sequence[SamplingParams],
            histories: list[TokenHistory]) -> tuple[torch.Tensor, torch.Tensor, list[str | None]]:
    """Penalties and logit_bias applied (to a copy, only when some row uses them): (adjusted logits, whether
    each row is still finite, each row's logit_bias error)."""
    ok = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    touched = [row for row, (p, h) in enumerate(zip(params, histories))
               if p.logit_bias or (p.uses_penalties and len(h.distinct))]
    if not touched:
        return logits, ok, [None] * logits.shape[0]
    adjusted = logits.clone()
    apply_penalties(adjusted, histories, params)
    bias_errors = apply_logit_bias(adjusted, params)
    index = torch.tensor(touched, device=logits.device)
    ok[index] = adjusted[index].amax(dim=-1).isfinite()
    return adjusted, ok, bias_errors


def _row_error(raw_ok: bool, bias_error: str | None, adjusted_ok: bool, distribution_ok: bool) -> str | None:
    """Why a row has no token, the earliest failure first; None where it has one."""
    if not raw_ok:
        return RAW_LOGITS_ERROR
    if bias_error:
        return bias_error
    if not adjusted_ok:
        return ADJUSTED_LOGITS_ERROR
    if not distribution_ok:
        return DISTRIBUTION_ERROR
    return None
