"""Causal attention that reads keys/values in place from a paged pool, in torch ops only.

A layer's pool is k_cache/v_cache [num_pages, page_size, Hkv, D], used as a flat [num_pages * page_size, Hkv, D]
array of token slots (see `PagedAttentionMetadata`). Grouped-query attention: Hq is a multiple of Hkv and
query head h reads kv head h // (Hq // Hkv).

- `write_kv`: new keys/values into their token slots.
- `paged_decode_attention`: one query per request, all requests in one varlen computation over the flat list
  of their keys (no padded [B, Lmax] copy, no loop over requests), in chunks of at most `chunk_tokens` keys
  so the workspace stays bounded. The softmax max is found in a first pass over the chunks and the sums in a
  second, so chunking does not change the result (on CPU, where index_add_ sums keys in order, bit for bit).
  With a single chunk the scores are computed once.
- `paged_extend_attention`: one request with n > 1 new tokens after a cached prefix, read through its page
  table, with SDPA and the causal mask.
- `paged_attention`: a mixed batch: writes, then the decode rows in one call and the extend rows per request.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.layers.paged_metadata import PagedAttentionMetadata

DEFAULT_WORKSPACE_BYTES = 256 << 20


def _flat(cache: torch.Tensor) -> torch.Tensor:
    """[num_pages, page_size, H, D] -> [num_pages * page_size, H, D] without a copy (fails on a non-contiguous
    cache rather than silently writing into a copy)."""
    return cache.view(-1, cache.shape[-2], cache.shape[-1])


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] stored at token slots slot_mapping [T]."""
    _flat(k_cache).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    _flat(v_cache).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def decode_chunk_tokens(workspace_bytes: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                        cache_dtype: torch.dtype) -> int:
    """Keys per decode chunk so that one chunk's temporaries fit in workspace_bytes: gathered keys and values
    (cache dtype and float32), the query of each key's request and the weighted values (float32, Hq heads)."""
    per_key = head_dim * (2 * num_kv_heads * (cache_dtype.itemsize + 4) + 2 * num_q_heads * 4) + num_q_heads * 8
    return max(1, workspace_bytes // per_key)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_slots: torch.Tensor,
                           key_owner: torch.Tensor, scaling: float, chunk_tokens: int) -> torch.Tensor:
    """q: [B, Hq, D], one query per request. key_slots/key_owner [N]: the token slot of every key of every
    request and the request (0..B-1) it belongs to; each request's keys include its own new token, so every
    request has at least one. Returns [B, Hq, D] in q's dtype (computed in float32)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    num_requests, num_heads, head_dim = q.shape
    k_flat, v_flat = _flat(k_cache), _flat(v_cache)
    num_kv_heads = k_flat.shape[1]
    group = num_heads // num_kv_heads
    queries = (q.float() * scaling).reshape(num_requests, num_kv_heads, group, head_dim)
    starts = range(0, key_slots.numel(), chunk_tokens)

    def scores(start: int) -> torch.Tensor:  # [n, Hkv, G]
        end = start + chunk_tokens
        keys = k_flat[key_slots[start:end]].float()  # [n, Hkv, D]
        return (queries[key_owner[start:end]] @ keys.unsqueeze(-1)).squeeze(-1)

    row_max = queries.new_full((num_requests, num_kv_heads, group), float("-inf"))
    single = scores(0) if len(starts) == 1 else None
    for start in starts:
        chunk_scores = single if single is not None else scores(start)
        owner = key_owner[start:start + chunk_tokens].view(-1, 1, 1).expand_as(chunk_scores)
        row_max.scatter_reduce_(0, owner, chunk_scores, "amax")
    denom = torch.zeros_like(row_max)
    acc = queries.new_zeros((num_requests, num_kv_heads, group, head_dim))
    for start in starts:
        owner = key_owner[start:start + chunk_tokens]
        chunk_scores = single if single is not None else scores(start)
        weights = torch.exp(chunk_scores - row_max[owner])  # [n, Hkv, G]
        values = v_flat[key_slots[start:start + chunk_tokens]].float()  # [n, Hkv, D]
        denom.index_add_(0, owner, weights)
        acc.index_add_(0, owner, weights.unsqueeze(-1) * values.unsqueeze(2))
    out = acc / denom.unsqueeze(-1)
    return out.view(num_requests, num_heads, head_dim).to(q.dtype)


def paged_extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_slots: torch.Tensor,
                           prefix_len: int, scaling: float) -> torch.Tensor:
    """q: [n, Hq, D], the queries of one request's new tokens at positions prefix_len .. prefix_len + n - 1;
    key_slots [prefix_len + n]: the token slots of all its keys in position order. Returns [n, Hq, D]."""
    n, total = q.shape[0], key_slots.numel()
    keys = _flat(k_cache)[key_slots].transpose(0, 1).to(q.dtype)  # [Hkv, total, D]
    values = _flat(v_cache)[key_slots].transpose(0, 1).to(q.dtype)
    # query i sits at position prefix_len + i and sees keys 0 .. prefix_len + i
    mask = torch.arange(total, device=q.device)[None, :] <= (prefix_len + torch.arange(n, device=q.device))[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask, scale=scaling,
                                         enable_gqa=True)  # [Hq, n, D]
    return out.transpose(0, 1)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: PagedAttentionMetadata, scaling: float, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                    chunk_tokens: int | None = None) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] of a packed step. Stores k/v into the pool, then attends every query to
    its request's cached prefix and the causal part of its new tokens. `chunk_tokens` overrides the decode
    chunk size derived from `workspace_bytes`. Returns [T, Hq, D]."""
    write_kv(k_cache, v_cache, meta.slot_mapping, k, v)
    out = torch.empty_like(q)
    if meta.decode_rows.numel():
        if chunk_tokens is None:
            chunk_tokens = decode_chunk_tokens(workspace_bytes, q.shape[1], k.shape[1], q.shape[2], k_cache.dtype)
        out[meta.decode_rows] = paged_decode_attention(q[meta.decode_rows], k_cache, v_cache, meta.decode_key_slots,
                                                       meta.decode_key_owner, scaling, chunk_tokens)
    for span in meta.extends:
        rows = slice(span.row_start, span.row_start + span.num_tokens)
        out[rows] = paged_extend_attention(q[rows], k_cache, v_cache, span.key_slots, span.prefix_len, scaling)
    return out
