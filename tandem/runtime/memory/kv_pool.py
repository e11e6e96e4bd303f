"""The paged KV pool of one stage, and how many tokens it can hold in a memory budget.

`PagedKVPool` stores keys and values of the stage's full-attention layers only, as
[num_attn_layers, kv_heads, num_pages, page_size, head_dim] (head-major: a page gather gives each kv head's
keys as one contiguous matrix, see `tandem.layers.paged_attention`); a token of page `p` at offset `o` sits
at token slot `p * page_size + o` of a layer's flattened [kv_heads, num_pages * page_size, head_dim] view.
Which pages a request holds is decided by the driver (`IdAllocator`), not here. The pool also owns the
`AttentionWorkspace` its layers' decode attention gathers pages into (at most `DEFAULT_WORKSPACE_BYTES`,
which the activation reserve accounts for; it is not part of `nbytes`).

`max_total_tokens_from_memory` turns a device's memory into a whole number of pages."""

from __future__ import annotations

import torch

from tandem.layers.attention_workspace import AttentionWorkspace
from tandem.layers.paged_attention import DEFAULT_WORKSPACE_BYTES


class PagedKVPool:
    @staticmethod
    def bytes_per_token(num_attn_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one token takes in a stage's pool: keys and values of every full-attention layer it holds."""
        return 2 * num_attn_layers * kv_heads * head_dim * dtype.itemsize

    def __init__(self, layer_ids: list[int], num_pages: int, page_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, zero_fill: bool = True):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {num_pages}")
        self.page_size, self.num_pages = page_size, num_pages
        self.index = {layer: i for i, layer in enumerate(layer_ids)}
        shape = (len(layer_ids), kv_heads, num_pages, page_size, head_dim)
        # NOTE: without zero_fill the pool is not touched here: on CPU its pages are only mapped when first
        # written, so a large pool costs no resident memory up front. Attention reads only written slots.
        make = torch.zeros if zero_fill else torch.empty
        self.k = make(shape, dtype=dtype, device=device)
        self.v = make(shape, dtype=dtype, device=device)
        self.workspace = AttentionWorkspace(DEFAULT_WORKSPACE_BYTES)

    @property
    def max_total_tokens(self) -> int:
        return self.num_pages * self.page_size

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one global layer index: two [kv_heads, num_pages, page_size, head_dim] views."""
        i = self.index[layer_idx]
        return self.k[i], self.v[i]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def max_total_tokens_from_memory(available_bytes: int, mem_fraction_static: float, weight_bytes: int,
                                 activation_reserve_bytes: int, bytes_per_token: int, page_size: int) -> int:
    """Tokens of KV a stage can hold: (available_bytes * mem_fraction_static - weights - activation reserve)
    / bytes_per_token, rounded down to whole pages. A stage without full-attention layers
    (bytes_per_token == 0) has no token limit: callers leave it out of the minimum over stages."""
    if not 0 < mem_fraction_static <= 1:
        raise ValueError(f"mem_fraction_static must be in (0, 1], got {mem_fraction_static}")
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be > 0, got {bytes_per_token} (a stage without full-attention "
                         f"layers has no token limit)")
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    static_bytes = int(available_bytes * mem_fraction_static)
    budget = static_bytes - weight_bytes - activation_reserve_bytes
    pages = max(budget, 0) // (bytes_per_token * page_size)
    if pages < 1:
        raise ValueError(
            f"no room for the KV cache: {mem_fraction_static} x {available_bytes} bytes = {static_bytes} bytes, "
            f"minus weights {weight_bytes} and activation reserve {activation_reserve_bytes}, leaves {budget} "
            f"bytes, less than one page of {page_size} tokens x {bytes_per_token} bytes "
            f"({page_size * bytes_per_token} bytes); raise --mem-fraction-static, use more pipeline stages, "
            f"or set --max-total-tokens")
    return pages * page_size
