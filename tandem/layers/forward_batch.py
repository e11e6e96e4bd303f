"""`ForwardBatch`: what one forward step computes on a stage.

Tokens of all requests are packed along one axis ([T, hidden]); `spans` say which request each run of
tokens belongs to: its linear-attention state slot, how many of its tokens are already cached and how many
are new. Full-attention layers find keys and values through `attn` (the step's `PagedAttentionMetadata`,
built once per step from the requests' page tables); Gated-DeltaNet layers through the state slots.

A verify span (speculative decoding: a request's last token plus its drafts, indices in `verify`) leaves its
request's linear-attention state untouched and records its inputs in `verify_ledger`, so that the state can
be committed at the accepted length once the drafts are judged (`tandem.layers.gdn_verify`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from tandem.layers.paged_metadata import PagedAttentionMetadata
from tandem.layers.span import Span
from tandem.layers.state_rows import StateRows


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64 (only the first stage needs them)
    positions: torch.Tensor  # [T] int64
    spans: list[Span]
    kv_pool: object = None  # PagedKVPool of this stage
    state_pool: object = None  # LinearStatePool of this stage
    attn: PagedAttentionMetadata | None = None  # None on a stage without full-attention layers
    verify: frozenset[int] = frozenset()  # indices of verify spans (last token + drafts)
    verify_ledger: object = None  # the stage's VerifyLedger, needed when `verify` is not empty
    offsets: list[int] = field(init=False)
    is_decode: bool = field(init=False)
    decode_spans: list[int] = field(init=False)  # spans continuing a cached request with one token

    def __post_init__(self) -> None:
        self.offsets, total = [], 0
        for span in self.spans:
            self.offsets.append(total)
            total += span.num_tokens
        self.num_tokens = total
        self.verify = frozenset(self.verify)
        for i in self.verify:
            if self.spans[i].prefix_len == 0:
                raise ValueError(f"verify span {i} has no cached prefix: a verify span continues a request")
        if self.verify and self.verify_ledger is None:
            raise ValueError("a step with verify spans needs the stage's verify ledger")
        self.decode_spans = [i for i, s in enumerate(self.spans)
                             if s.num_tokens == 1 and s.prefix_len > 0 and i not in self.verify]
        self.is_decode = len(self.decode_spans) == len(self.spans)

    @classmethod
    def build(cls, spans: list[Span], input_ids: list[int] | torch.Tensor, device="cpu", verify=(),
              verify_ledger=None) -> "ForwardBatch":
        positions = torch.cat([torch.arange(s.prefix_len, s.prefix_len + s.num_tokens) for s in spans])
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        return cls(ids.to(device), positions.to(device), spans, verify=frozenset(verify), verify_ledger=verify_ledger)

    @cached_property
    def decode_state_rows(self) -> StateRows:
        """Where the decode spans' (in `decode_spans` order) linear-attention states live in the state pool;
        built once per step for all Gated-DeltaNet layers."""
        return StateRows([self.spans[i].state_slot for i in self.decode_spans], self.positions.device)

    @cached_property
    def verify_groups(self) -> dict[int, list[int]]:
        """Verify spans by their number of tokens (each group runs batched): {tokens: [span indices]}."""
        groups: dict[int, list[int]] = {}
        for i in sorted(self.verify):
            groups.setdefault(self.spans[i].num_tokens, []).append(i)
        return groups

    @cached_property
    def verify_rows(self) -> dict[int, torch.Tensor | slice]:
        """The packed rows of each verify group (`verify_groups`' keys), span after span: a slice where they are
        one run (a batch of verify spans only, the common case), else an index; built once per step."""
        rows = {}
        for length, group in self.verify_groups.items():
            index = [self.offsets[i] + t for i in group for t in range(length)]
            contiguous = index == list(range(index[0], index[0] + len(index)))
            rows[length] = (slice(index[0], index[0] + len(index)) if contiguous
                            else torch.tensor(index, dtype=torch.long, device=self.positions.device))
        return rows

    def last_token_indices(self) -> torch.Tensor:
        return torch.tensor([o + s.num_tokens - 1 for o, s in zip(self.offsets, self.spans)], dtype=torch.long)
