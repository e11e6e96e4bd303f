"""Causal attention of packed requests over the stage's KV cache (torch SDPA).

Each request's new keys/values are written into its cache slot at [prefix_len, prefix_len + n); its
queries then attend to the whole cached prefix plus the causal part of the new tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.layers.forward_batch import ForwardBatch


def cached_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch,
                           k_cache: torch.Tensor, v_cache: torch.Tensor, scaling: float) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D]; caches: [slots, max_len, Hkv, D]. Returns [T, Hq, D]."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_heads // num_kv_heads
    if batch.is_decode:
        return _decode_attention(q, k, v, batch, k_cache, v_cache, scaling, group)
    out = torch.empty_like(q)
    for offset, span in zip(batch.offsets, batch.spans):
        n, prefix, slot = span.num_tokens, span.prefix_len, span.slot
        total = prefix + n
        k_cache[slot, prefix:total] = k[offset:offset + n]
        v_cache[slot, prefix:total] = v[offset:offset + n]
        keys = k_cache[slot, :total].transpose(0, 1)  # [Hkv, total, D]
        values = v_cache[slot, :total].transpose(0, 1)
        if group > 1:
            keys = keys.repeat_interleave(group, dim=0)  # [Hq, total, D]
            values = values.repeat_interleave(group, dim=0)
        queries = q[offset:offset + n].transpose(0, 1)  # [Hq, n, D]
        mask = None
        if n > 1:
            # query i sits at position prefix + i and sees keys 0..prefix + i
            mask = torch.arange(total, device=q.device)[None, :] <= (prefix + torch.arange(n, device=q.device))[:, None]
        attn = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scaling)
        out[offset:offset + n] = attn.transpose(0, 1)
    return out


def _decode_attention(q, k, v, batch: ForwardBatch, k_cache, v_cache, scaling: float, group: int) -> torch.Tensor:
    """One new token per request: a single padded SDPA call over all requests instead of a Python loop."""
    slots, positions = batch.slots.to(q.device), batch.positions  # [B]; a decode token sits at prefix_len
    k_cache[slots, positions] = k
    v_cache[slots, positions] = v
    length = int(positions.max()) + 1
    keys = k_cache[slots, :length].transpose(1, 2)  # [B, Hkv, L, D]
    values = v_cache[slots, :length].transpose(1, 2)
    if group > 1:
        keys = keys.repeat_interleave(group, dim=1)  # [B, Hq, L, D]
        values = values.repeat_interleave(group, dim=1)
    mask = torch.arange(length, device=q.device)[None, :] <= positions[:, None]  # [B, L]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :],
                                         scale=scaling)  # [B, Hq, 1, D]
    return out.squeeze(2)
