"""Structured output on the last stage: the driver's packed allowed-token bitmasks (`StepInput.token_bitmask`)
unpacked for the rows they constrain and applied to the adjusted logits, after penalties and logit_bias and
before temperature, top-k, top-p and min-p (so greedy picks the most likely allowed token). Disallowed tokens
get -inf; the rows without a mask are not touched. A verify span (speculative decoding) in `bitmask_rows` has one
bitmask row per position (1 + its drafts, each the grammar's state after the drafts before it), in order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class TokenMask:
    rows: list[int]  # rows of the sampled logits that are constrained
    allowed: torch.Tensor  # bool [len(rows), vocab]


def unpack_bitmask(data: bytes, num_rows: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    """bool [num_rows, vocab_size] from int32 [num_rows, ceil(V / 32)] little-endian words (bit j of word w:
    token 32 w + j)."""
    words = -(-vocab_size // 32)
    if len(data) != num_rows * words * 4:
        raise ValueError(f"a token bitmask of {len(data)} bytes for {num_rows} rows of {vocab_size} tokens "
                         f"(expected {num_rows * words * 4})")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little").reshape(num_rows, words * 32)
    return torch.from_numpy(bits[:, :vocab_size]).to(device=device, dtype=torch.bool)


@dataclass
class StepMasks:
    sampled: TokenMask | None = None  # over the plain sampled rows
    spans: dict[int, torch.Tensor] = field(default_factory=dict)  # verify span -> bool [1 + drafts, vocab]


def step_token_masks(bitmask_rows: list[int] | None, data: bytes | None, sampled: list[int], vocab_size: int,
                     device: torch.device, num_drafts: Callable[[int], int] = lambda span: 0) -> StepMasks:
    """The step's masks: `bitmask_rows` are span indices, `sampled` the plain spans that sample, in the order
    of the sampled logits; a span with drafts (`num_drafts(span)` > 0) takes 1 + that many bitmask rows."""
    if not bitmask_rows:
        return StepMasks()
    position = {span: row for row, span in enumerate(sampled)}
    sizes = [1 + num_drafts(span) for span in bitmask_rows]
    missing = [span for span, size in zip(bitmask_rows, sizes) if size == 1 and span not in position]
    if missing:
        raise ValueError(f"token bitmask for span(s) {missing} that sample no token")
    allowed = unpack_bitmask(data or b"", sum(sizes), vocab_size, device)
    plain, plain_rows, spans, start = [], [], {}, 0
    for span, size in zip(bitmask_rows, sizes):
        if size == 1:
            plain.append(position[span])
            plain_rows.append(start)
        else:
            spans[span] = allowed[start:start + size]
        start += size
    return StepMasks(TokenMask(plain, allowed[plain_rows]) if plain else None, spans)


def step_token_mask(bitmask_rows: list[int] | None, data: bytes | None, sampled: list[int], vocab_size: int,
                    device: torch.device) -> TokenMask | None:
    """The mask over the sampled rows of a step without verify spans."""
    return step_token_masks(bitmask_rows, data, sampled, vocab_size, device).sampled


def apply_token_mask(adjusted: torch.Tensor, raw: torch.Tensor, mask: TokenMask) -> torch.Tensor:
    """`adjusted` [B, V] with the masked rows' disallowed tokens at -inf; a copy when `adjusted` is the raw
    logits (which the reported logprobs are computed from)."""
    if adjusted is raw:
        adjusted = raw.clone()
    index = torch.tensor(mask.rows, device=adjusted.device)
    adjusted[index] = adjusted[index].masked_fill(~mask.allowed, float("-inf"))
    return adjusted
