"""`ForwardBatch`: what one forward step computes on a stage.

Tokens of all requests are packed along one axis ([T, hidden]); `spans` say which request each run of
tokens belongs to, where its cache slot is and how many of its tokens are already cached. A decode step
is a batch whose spans all hold one token of a request with a non-empty cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Span:
    slot: int  # cache slot of the request
    prefix_len: int  # tokens of this request already in the cache
    num_tokens: int  # new tokens in this step


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64 (only the first stage needs them)
    positions: torch.Tensor  # [T] int64
    spans: list[Span]
    kv_cache: object = None  # KVCachePool of this stage
    state_cache: object = None  # GDNStatePool of this stage
    offsets: list[int] = field(init=False)
    is_decode: bool = field(init=False)
    slots: torch.Tensor = field(init=False)  # [B] int64

    def __post_init__(self) -> None:
        self.offsets, total = [], 0
        for span in self.spans:
            self.offsets.append(total)
            total += span.num_tokens
        self.num_tokens = total
        self.is_decode = all(s.num_tokens == 1 and s.prefix_len > 0 for s in self.spans)
        self.slots = torch.tensor([s.slot for s in self.spans], dtype=torch.long)

    @classmethod
    def build(cls, spans: list[Span], input_ids: list[int] | torch.Tensor, device="cpu") -> "ForwardBatch":
        positions = torch.cat([torch.arange(s.prefix_len, s.prefix_len + s.num_tokens) for s in spans])
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        return cls(ids.to(device), positions.to(device), spans)

    def last_token_indices(self) -> torch.Tensor:
        return torch.tensor([o + s.num_tokens - 1 for o, s in zip(self.offsets, self.spans)], dtype=torch.long)
