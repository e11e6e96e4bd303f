"""`Span`: one request's run of tokens in a forward step. Torch-free, so that the driver's scheduler (which
imports no torch) and the step messages can use it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    state_slot: int  # linear-attention state slot of the request
    prefix_len: int  # tokens of this request already in the cache
    num_tokens: int  # new tokens in this step
