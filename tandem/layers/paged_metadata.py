"""`PagedAttentionMetadata`: where one step's tokens write their keys/values and where each query reads them.

Built once per step, on the host, from the requests' page tables and shared by every full-attention layer of
the stage. Token position t of a request whose page table is P sits at token slot P[t // page_size] *
page_size + t % page_size of a layer's pool (viewed as [Hkv, num_pages * page_size, D]).

Requests with one new token (decodes, and one-token prefills) go to the decode path in `DecodeGroup`s:
padded batches whose pages are gathered into one [Hkv, B, keys, D] workspace. The decode requests are sorted
by length, longest first, and each goes into the current group unless
- its page count is less than half the group's longest (so at most half of a group's key slots are
  padding), or
- the group would then hold more than `chunk_keys` key slots (requests x the longest's pages x page_size);
then it starts a new group. A request longer than `chunk_keys` is a group of its own whose pages are split
into chunks of at most `chunk_keys` keys (at least one page), combined with an online softmax. Requests
with more new tokens go to the extend path, one request at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeChunk:
    page_ids: torch.Tensor  # [B * pages] the pages of each request of the group, request by request
    key_mask: torch.Tensor  # [B, pages * page_size] True for a key the request has, False for padding
    pad_slots: torch.Tensor  # [n] positions in the flattened [B * pages * page_size] keys that are padding


@dataclass(frozen=True)
class DecodeGroup:
    rows: torch.Tensor  # [B] rows of the packed batch of the group's requests
    chunks: tuple[DecodeChunk, ...]  # consecutive page ranges of all the group's requests, position 0 first


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
    decode_groups: tuple[DecodeGroup, ...]
    extends: tuple[ExtendSpan, ...]

    @property
    def num_decode_rows(self) -> int:
        return sum(group.rows.numel() for group in self.decode_groups)

    @classmethod
    def build(cls, page_tables: list[list[int]], prefix_lens: list[int], num_tokens: list[int], page_size: int,
              chunk_keys: int, device="cpu") -> PagedAttentionMetadata:
        """Requests in packed-batch order: request i has prefix_lens[i] cached tokens and num_tokens[i] new ones,
        stored in the pages page_tables[i] (enough pages for prefix + new tokens). `chunk_keys`: the most key
        slots (requests x padded keys) one decode workspace chunk may hold (`decode_chunk_keys`)."""
        if not len(page_tables) == len(prefix_lens) == len(num_tokens):
            raise ValueError(f"{len(page_tables)} page tables, {len(prefix_lens)} prefix lengths, "
                             f"{len(num_tokens)} token counts: one of each per request")
        if chunk_keys < 1:
            raise ValueError(f"chunk_keys must be >= 1, got {chunk_keys}")
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
        rows = new.cumsum(0) - new

        def slots(owner: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            page = flat_pages[page_start[owner] + position // page_size]
            return page * page_size + position % page_size

        owner, position = _ranges(prefix, new)  # every new token
        slot_mapping = slots(owner, position)

        decode_groups = []
        decodes = [i for i, n in enumerate(num_tokens) if n == 1]
        for members in _group_decodes(decodes, [prefix_lens[i] + 1 for i in decodes], page_size, chunk_keys):
            members = torch.tensor(members, dtype=torch.long)
            decode_groups.append(_decode_group(rows[members], prefix[members] + 1, flat_pages, page_start[members],
                                               page_size, chunk_keys, device))

        extends = []
        for i, (p, n) in enumerate(zip(prefix_lens, num_tokens)):
            if n > 1:
                key_slots = slots(torch.full((p + n,), i, dtype=torch.long), torch.arange(p + n))
                extends.append(ExtendSpan(int(rows[i]), n, p, key_slots.to(device)))
        return cls(page_size, slot_mapping.to(device), tuple(decode_groups), tuple(extends))


def _group_decodes(requests: list[int], lengths: list[int], page_size: int, chunk_keys: int) -> list[list[int]]:
    """The module docstring's grouping rule: `requests` split into groups, each longest first."""
    groups: list[list[int]] = []
    group_pages = 0
    for length, request in sorted(zip(lengths, requests), key=lambda pair: -pair[0]):
        pages = -(-length // page_size)
        if groups and 2 * pages >= group_pages and (len(groups[-1]) + 1) * group_pages * page_size <= chunk_keys:
            groups[-1].append(request)
        else:
            groups.append([request])
            group_pages = pages
    return groups


def _decode_group(rows: torch.Tensor, lengths: torch.Tensor, flat_pages: torch.Tensor,
                  page_start: torch.Tensor, page_size: int, chunk_keys: int, device) -> DecodeGroup:
    """One group: its requests' pages padded to the longest's (padding repeats a request's last page; those
    keys are masked out), split into chunks of whole pages of at most `chunk_keys` key slots."""
    num_requests = rows.numel()
    num_pages = -(-lengths // page_size)
    longest = int(num_pages.max())
    page_index = torch.minimum(torch.arange(longest)[None, :], (num_pages - 1)[:, None])
    page_ids = flat_pages[page_start[:, None] + page_index]  # [B, longest]
    key_mask = torch.arange(longest * page_size)[None, :] < lengths[:, None]
    chunk_pages = max(1, chunk_keys // (num_requests * page_size))
    chunks = []
    for first in range(0, longest, chunk_pages):
        last = min(first + chunk_pages, longest)
        mask = key_mask[:, first * page_size:last * page_size].contiguous()
        chunks.append(DecodeChunk(page_ids[:, first:last].flatten().to(device), mask.to(device),
                                  (~mask).flatten().nonzero().flatten().to(device)))
    return DecodeGroup(rows.to(device), tuple(chunks))


def _ranges(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each i the values starts[i] .. starts[i] + lengths[i] - 1, concatenated: (owner i, value)."""
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    offsets = torch.arange(int(lengths.sum())) - (lengths.cumsum(0) - lengths)[owner]
    return owner, starts[owner] + offsets
