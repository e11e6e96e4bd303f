"""Causal attention that reads keys/values in place from a paged pool, in torch ops only.

A layer's pool is k_cache/v_cache [Hkv, num_pages, page_size, D], head-major so that gathering pages along
dim 1 gives each kv head's keys as one contiguous [keys, D] matrix (batched matmuls on it need no copy).
Viewed as [Hkv, num_pages * page_size, D] it is an array of token slots (see `PagedAttentionMetadata`).
Grouped-query attention: Hq is a multiple of Hkv and query head h reads kv head h // (Hq // Hkv).

- `write_kv`: new keys/values into their token slots.
- `paged_decode_attention`: one query per request for a `DecodeGroup` of requests: their pages are gathered
  with `index_select` into a reused workspace as [Hkv, B, keys, D] (padded to the group's longest request),
  scores are one batched matmul in the cache dtype, the softmax is in float32 with padding masked out, and
  the probabilities (cast back to the cache dtype) multiply the values in one more batched matmul. A group
  whose keys come in several chunks combines them with an online softmax (running max, rescaled sums).
- `paged_extend_attention`: one request with n > 1 new tokens after a cached prefix, read through its page
  table, with SDPA and the causal mask.
- `paged_attention`: a mixed batch: writes, then the decode rows group by group and the extend rows per
  request.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.layers.attention_workspace import AttentionWorkspace
from tandem.layers.paged_metadata import DecodeChunk, DecodeGroup, PagedAttentionMetadata

DEFAULT_WORKSPACE_BYTES = 256 << 20


def decode_chunk_keys(workspace_bytes: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                      cache_dtype: torch.dtype) -> int:
    """Key slots (requests x padded keys) per decode chunk so that one chunk's temporaries fit in
    workspace_bytes: the gathered keys and values (cache dtype), and per query head the scores (cache dtype
    and float32), the float32 probabilities and their cast to the cache dtype."""
    per_key = 2 * num_kv_heads * head_dim * cache_dtype.itemsize + num_q_heads * (2 * cache_dtype.itemsize + 8)
    return max(1, workspace_bytes // per_key)


def _flat(cache: torch.Tensor) -> torch.Tensor:
    """[Hkv, num_pages, page_size, D] -> [Hkv, num_pages * page_size, D] without a copy (fails on a
    non-contiguous cache rather than silently writing into a copy)."""
    return cache.view(cache.shape[0], -1, cache.shape[-1])


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] stored at token slots slot_mapping [T]."""
    _flat(k_cache).index_copy_(1, slot_mapping, k.transpose(0, 1).to(k_cache.dtype))
    _flat(v_cache).index_copy_(1, slot_mapping, v.transpose(0, 1).to(v_cache.dtype))


def _gather(cache: torch.Tensor, chunk: DecodeChunk, num_requests: int, workspace: AttentionWorkspace | None,
            name: str) -> torch.Tensor:
    """The chunk's pages of `cache` as [Hkv, B, keys, D]."""
    num_kv_heads, _, page_size, head_dim = cache.shape
    shape = (num_kv_heads, chunk.page_ids.numel(), page_size, head_dim)
    if workspace is None:
        pages = cache.index_select(1, chunk.page_ids)
    else:
        pages = torch.index_select(cache, 1, chunk.page_ids,
                                   out=workspace.view(name, shape, cache.dtype, cache.device))
    return pages.view(num_kv_heads, num_requests, -1, head_dim)


def _chunk_scores(queries: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, chunk: DecodeChunk,
                  scaling: float, workspace: AttentionWorkspace | None) -> tuple[torch.Tensor, torch.Tensor]:
    """queries [Hkv, B, G, D] in the cache dtype. Returns the chunk's float32 scores [Hkv, B, G, keys], padding
    at -inf, and its values [Hkv, B, keys, D] with padding zeroed."""
    num_requests = queries.shape[1]
    keys = _gather(k_cache, chunk, num_requests, workspace, "keys")
    values = _gather(v_cache, chunk, num_requests, workspace, "values")
    # padding slots hold whatever the pool had there (NaN is possible): a zero weight does not cancel a NaN
    values.view(values.shape[0], -1, values.shape[-1]).index_fill_(1, chunk.pad_slots, 0)
    scores = torch.matmul(queries, keys.transpose(-1, -2)).float().mul_(scaling)
    scores.masked_fill_(~chunk.key_mask[None, :, None, :], float("-inf"))
    return scores, values


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup,
                           scaling: float, workspace: AttentionWorkspace | None = None) -> torch.Tensor:
    """q: [B, Hq, D], one query per request of `group`. Returns [B, Hq, D] in q's dtype. Without a workspace
    the gathered pages are fresh tensors."""
    num_requests, num_heads, head_dim = q.shape
    num_kv_heads, dtype = k_cache.shape[0], k_cache.dtype
    queries = q.to(dtype).view(num_requests, num_kv_heads, -1, head_dim).transpose(0, 1).contiguous()
    if len(group.chunks) == 1:
        scores, values = _chunk_scores(queries, k_cache, v_cache, group.chunks[0], scaling, workspace)
        out = torch.matmul(torch.softmax(scores, dim=-1).to(dtype), values)
    else:
        row_max = denom = out = None
        for chunk in group.chunks:  # the first chunk holds position 0 of every request: row_max is then finite
            scores, values = _chunk_scores(queries, k_cache, v_cache, chunk, scaling, workspace)
            chunk_max = scores.amax(dim=-1, keepdim=True)
            new_max = chunk_max if row_max is None else torch.maximum(row_max, chunk_max)
            weights = torch.exp(scores - new_max)
            part = torch.matmul(weights.to(dtype), values).float()
            if row_max is None:
                denom, out = weights.sum(dim=-1, keepdim=True), part
            else:
                rescale = torch.exp(row_max - new_max)
                denom = denom * rescale + weights.sum(dim=-1, keepdim=True)
                out = out * rescale + part
            row_max = new_max
        out = out / denom
    return out.transpose(0, 1).reshape(num_requests, num_heads, head_dim).to(q.dtype)


def paged_extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_slots: torch.Tensor,
                           prefix_len: int, scaling: float) -> torch.Tensor:
    """q: [n, Hq, D], the queries of one request's new tokens at positions prefix_len .. prefix_len + n - 1;
    key_slots [prefix_len + n]: the token slots of all its keys in position order. Returns [n, Hq, D]."""
    n, total = q.shape[0], key_slots.numel()
    keys = _flat(k_cache).index_select(1, key_slots).to(q.dtype)  # [Hkv, total, D]
    values = _flat(v_cache).index_select(1, key_slots).to(q.dtype)
    # query i sits at position prefix_len + i and sees keys 0 .. prefix_len + i
    mask = torch.arange(total, device=q.device)[None, :] <= (prefix_len + torch.arange(n, device=q.device))[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask, scale=scaling,
                                         enable_gqa=True)  # [Hq, n, D]
    return out.transpose(0, 1)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: PagedAttentionMetadata, scaling: float,
                    workspace: AttentionWorkspace | None = None) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] of a packed step. Stores k/v into the pool, then attends every query to
    its request's cached prefix and the causal part of its new tokens. Returns [T, Hq, D]."""
    write_kv(k_cache, v_cache, meta.slot_mapping, k, v)
    out = torch.empty_like(q)
    for group in meta.decode_groups:
        out.index_copy_(0, group.rows, paged_decode_attention(q.index_select(0, group.rows), k_cache, v_cache,
                                                              group, scaling, workspace))
    for span in meta.extends:
        rows = slice(span.row_start, span.row_start + span.num_tokens)
        out[rows] = paged_extend_attention(q[rows], k_cache, v_cache, span.key_slots, span.prefix_len, scaling)
    return out
