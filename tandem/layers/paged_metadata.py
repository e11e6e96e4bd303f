"""`PagedAttentionMetadata`: where one step's tokens write their keys/values and where each query reads them.

Built once per step from the requests' page tables and shared by every full-attention layer of the stage.
Token position t of a request whose page table is P sits at token slot P[t // page_size] * page_size +
t % page_size of a layer's flattened pool. Requests with one new token (decodes, and one-token prefills)
go to the varlen decode path as one flat list of all their keys; requests with more new tokens go to the
extend path, one request at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExtendSpan:
    row_start: int  # first row of this request's new tokens in the packed batch
    num_tokens: int  # new tokens (> 1)
    prefix_len: int  # tokens already cached before this step
    key_slots: torch.Tensor  # [prefix_len + num_tokens] token slots of all its keys, in position order


@dataclass(frozen=True)
class PagedAttentionMetadata:
    page_size: int
    slot_mapping: torch.Tensor  # [T] token slot each new token's key/value is written to
    decode_rows: torch.Tensor  # [Bd] rows of the packed batch that are one-token requests
    decode_key_slots: torch.Tensor  # [sum of their lengths] every key of every decode request, request by request
    decode_key_owner: torch.Tensor  # [same] which decode request (0..Bd-1) each of those keys belongs to
    extends: tuple[ExtendSpan, ...]

    @classmethod
    def build(cls, page_tables: list[list[int]], prefix_lens: list[int], num_tokens: list[int], page_size: int,
              device="cpu") -> PagedAttentionMetadata:
        """Requests in packed-batch order: request i has prefix_lens[i] cached tokens and num_tokens[i] new ones,
        stored in the pages page_tables[i] (enough pages for prefix + new tokens)."""
        if not len(page_tables) == len(prefix_lens) == len(num_tokens):
            raise ValueError(f"{len(page_tables)} page tables, {len(prefix_lens)} prefix lengths, "
                             f"{len(num_tokens)} token counts: one of each per request")
        for i, (table, prefix, n) in enumerate(zip(page_tables, prefix_lens, num_tokens)):
            if n < 1 or prefix < 0:
                raise ValueError(f"request {i}: {n} new tokens after a prefix of {prefix}")
            if len(table) * page_size < prefix + n:
                raise ValueError(f"request {i}: {prefix + n} tokens do not fit its {len(table)} pages of "
                                 f"{page_size}")
        flat_pages = torch.tensor([p for table in page_tables for p in table], dtype=torch.long)
        page_start = torch.tensor([0] + [len(t) for t in page_tables], dtype=torch.long).cumsum(0)[:-1]
        prefix = torch.tensor(prefix_lens, dtype=torch.long)
        new = torch.tensor(num_tokens, dtype=torch.long)

        def slots(owner: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            page = flat_pages[page_start[owner] + position // page_size]
            return page * page_size + position % page_size

        owner, position = _ranges(prefix, new)  # every new token
        slot_mapping = slots(owner, position)

        is_decode = new == 1
        decode_rows = (new.cumsum(0) - new)[is_decode]
        decode_requests = is_decode.nonzero().flatten()
        local_owner, key_position = _ranges(torch.zeros_like(decode_requests), prefix[decode_requests] + 1)
        decode_key_slots = slots(decode_requests[local_owner], key_position)

        extends, row = [], 0
        for i, (p, n) in enumerate(zip(prefix_lens, num_tokens)):
            if n > 1:
                key_slots = slots(torch.full((p + n,), i, dtype=torch.long), torch.arange(p + n))
                extends.append(ExtendSpan(row, n, p, key_slots.to(device)))
            row += n
        return cls(page_size, slot_mapping.to(device), decode_rows.to(device), decode_key_slots.to(device),
                   local_owner.to(device), tuple(extends))


def _ranges(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each i the values starts[i] .. starts[i] + lengths[i] - 1, concatenated: (owner i, value)."""
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    offsets = torch.arange(int(lengths.sum())) - (lengths.cumsum(0) - lengths)[owner]
    return owner, starts[owner] + offsets
