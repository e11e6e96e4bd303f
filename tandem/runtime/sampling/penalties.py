"""Per-request token history and the logit adjustments applied before temperature, batched over [B, V]:
repetition_penalty, then frequency_penalty and presence_penalty, then logit_bias (SGLang's order).

- repetition_penalty (SGLang/vLLM/HF): for every token seen in the prompt or the output,
  logit > 0 -> logit / penalty, else logit * penalty.
- frequency/presence (OpenAI): over tokens generated so far,
  logit -= frequency_penalty * count + presence_penalty * (count > 0).
- logit_bias (OpenAI): logit += bias.

A `TokenHistory` counts a request's distinct tokens in compact arrays; each step they are concatenated into
(row, token, count) index tensors and applied with one gather and one scatter, never a loop over the vocabulary."""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import torch

from tandem.runtime.sampling.params import SamplingParams


class TokenHistory:
    """What the sampler knows of one request: its prompt length and how many of its tokens went through the
    model; with `count_tokens`, also how often each distinct token occurs in the prompt and in the output."""

    def __init__(self, prompt_len: int, count_tokens: bool):
        if prompt_len < 0:
            raise ValueError(f"prompt_len must be >= 0, got {prompt_len}")
        self.prompt_len = prompt_len
        self.count_tokens = count_tokens
        self.length = 0  # tokens observed: positions [0, length)
        self.tokens = array("q")  # token at each position (kept only when counting, to undo a rollback)
        self.distinct = array("q")  # distinct token ids seen
        self.total_counts = array("q")  # per distinct token: occurrences at any position
        self.output_counts = array("q")  # per distinct token: occurrences at positions >= prompt_len
        self._slot: dict[int, int] = {}  # token id -> index into the three arrays above

    @property
    def num_generated(self) -> int:
        """Generated tokens already observed (= the index of the next token to be sampled)."""
        return max(0, self.length - self.prompt_len)

    def observe(self, token_ids: Sequence[int], start_position: int) -> None:
        """Tokens fed through the model at positions start_position, start_position + 1, ... A start before
        the end of what was observed replaces the tokens from there on (their counts are undone)."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        if not 0 <= start_position <= self.length:
            raise ValueError(f"observe() at position {start_position}, but only positions [0, {self.length}) "
                             f"were observed: a gap would leave tokens uncounted")
        if start_position < self.length:
            self._forget_from(start_position)
        if self.count_tokens:
            for position, token in enumerate(token_ids, start_position):
                slot = self._slot.get(token)
                if slot is None:
                    slot = self._slot[token] = len(self.distinct)
                    self.distinct.append(token)
                    self.total_counts.append(0)
                    self.output_counts.append(0)
                self.total_counts[slot] += 1
                if position >= self.prompt_len:
                    self.output_counts[slot] += 1
            self.tokens.extend(token_ids)
        self.length = start_position + len(token_ids)

    def slot_of(self, token: int) -> int:
        """The index of a counted token in `distinct` (and the count arrays)."""
        return self._slot[token]

    def skip_to(self, position: int) -> None:
        """Start observing at `position` without the tokens before it (a prefix-cache hit of a request that
        counts nothing); a counting history needs those tokens."""
        if self.count_tokens:
            raise ValueError("a request that uses penalties needs the tokens of its cached prefix (prefix_ids)")
        self.length = position

    def _forget_from(self, position: int) -> None:
        if self.count_tokens:
            for p in range(position, self.length):
                slot = self._slot[self.tokens[p]]
                self.total_counts[slot] -= 1
                if p >= self.prompt_len:
                    self.output_counts[slot] -= 1
            del self.tokens[position:]
        self.length = position


def _int64(values: array) -> torch.Tensor:
    return torch.frombuffer(values, dtype=torch.int64)


def apply_penalties(logits: torch.Tensor, histories: Sequence[TokenHistory], params: Sequence[SamplingParams]) -> None:
    """Apply repetition, frequency and presence penalties in place to `logits` [B, V], row i from
    `histories[i]` and `params[i]`. Rows whose params use no penalty are untouched."""
    rows, sizes, parts = [], [], []
    for row, (history, p) in enumerate(zip(histories, params)):
        if p.uses_penalties and len(history.distinct):
            rows.append(row)
            sizes.append(len(history.distinct))
            parts.append(history)
    if not rows:
        return
    device = logits.device
    table = torch.stack([torch.cat([_int64(h.distinct) for h in parts]),
                         torch.cat([_int64(h.total_counts) for h in parts]),
                         torch.cat([_int64(h.output_counts) for h in parts])]).to(device)
    row_of = torch.repeat_interleave(torch.tensor(rows), torch.tensor(sizes)).to(device)
    factors = _factors(params, logits.dtype, device)[row_of]
    _penalize(logits, row_of, table[0], table[1], table[2], factors)


def apply_verify_penalties(logits: torch.Tensor, histories: Sequence[TokenHistory], params: Sequence[SamplingParams],
                           drafts: Sequence[Sequence[int]]) -> None:
    """Penalties in place on a step's verify rows (speculative decoding): logits [sum(1 + k_i), V], span i's
    1 + k_i rows in order. `histories[i]` has observed span i's tokens (the request's last token, then its
    drafts), so row r of span i is penalized with that history less drafts[r:], the tokens after its position:
    exactly the history the plain sampler has when it samples there (every draft is an output token)."""
    row_parts, count_parts, span_params, entries, start = [], [], [], [], 0
    for history, p, span_drafts in zip(histories, params, drafts):
        n = len(span_drafts) + 1
        if p.uses_penalties and len(history.distinct):
            size = len(history.distinct)
            base = torch.stack([_int64(history.distinct), _int64(history.total_counts),
                                _int64(history.output_counts)])  # [3, D]
            # later[r, s]: how often distinct token s occurs among drafts[r:]
            later = torch.zeros(n, size, dtype=torch.int64)
            if span_drafts:
                slots = torch.tensor([history.slot_of(t) for t in span_drafts])
                later.index_add_(1, slots, torch.ones(n, len(span_drafts), dtype=torch.int64).triu())
            counts = torch.stack([base[0].expand(n, size), base[1] - later, base[2] - later])  # [3, n, D]
            count_parts.append(counts.reshape(3, n * size))
            row_parts.append(torch.arange(start, start + n).repeat_interleave(size))
            span_params.append(p)
            entries.append(n * size)
        start += n
    if not row_parts:
        return
    device = logits.device
    table = torch.cat(count_parts, dim=1).to(device)
    factors = _factors(span_params, logits.dtype, device)[
        torch.repeat_interleave(torch.arange(len(entries)), torch.tensor(entries)).to(device)]
    _penalize(logits, torch.cat(row_parts).to(device), table[0], table[1], table[2], factors)


def _factors(params: Sequence[SamplingParams], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor([[p.repetition_penalty, p.frequency_penalty, p.presence_penalty] for p in params],
                        dtype=dtype).to(device)


def _penalize(logits: torch.Tensor, row_of: torch.Tensor, tokens: torch.Tensor, total: torch.Tensor,
              output: torch.Tensor, factors: torch.Tensor) -> None:
    """Entry e: token tokens[e] of row row_of[e], seen total[e] times (output[e] of them in the output),
    with its row's [repetition, frequency, presence] factors[e]; (row, token) pairs are unique."""
    output = output.to(logits.dtype)
    values = logits[row_of, tokens]
    repeated = torch.where(values > 0, values / factors[:, 0], values * factors[:, 0])
    values = torch.where(total > 0, repeated, values)
    values = values - factors[:, 1] * output - factors[:, 2] * (output > 0).to(logits.dtype)
    logits[row_of, tokens] = values


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> list[str | None]:
    """Add each row's logit_bias in place to `logits` [B, V]. Returns a per-row error for a row whose bias
    names a token outside [0, V) (that row gets no bias); None elsewhere."""
    vocab_size = logits.shape[1]
    errors: list[str | None] = [None] * len(params)
    rows, tokens, biases = [], [], []
    for row, p in enumerate(params):
        if not p.logit_bias:
            continue
        outside = sorted(t for t in p.logit_bias if t >= vocab_size)
        if outside:
            errors[row] = (f"logit_bias token id(s) {outside[:10]} are outside the vocabulary "
                           f"(ids 0..{vocab_size - 1})")
            continue
        rows.extend([row] * len(p.logit_bias))
        tokens.extend(p.logit_bias)
        biases.extend(p.logit_bias.values())
    if rows:
        device = logits.device
        logits.index_put_((torch.tensor(rows, device=device), torch.tensor(tokens, device=device)),
                          torch.tensor(biases, dtype=logits.dtype, device=device), accumulate=True)
    return errors
