"""Paged attention against a dense reference: torch SDPA over each request's contiguous keys/values with the
causal mask, for random shuffled non-contiguous page tables, GQA, mixed decode/prefill/extend batches, fp32
and bf16. The pool starts as NaN, so reading any slot a request does not own poisons the output. Also:
chunked decode equals unchunked, and the metadata's token slots against hand-computed ones."""

import random

import pytest
import torch
import torch.nn.functional as F

from tandem.layers.paged_attention import paged_attention, paged_decode_attention
from tandem.layers.paged_metadata import PagedAttentionMetadata

HEAD_DIM = 16


def dense_reference(q, keys, values, prefix_len, scaling):
    """q [n, Hq, D] at positions prefix_len.., keys/values [prefix_len + n, Hkv, D]: plain causal attention in
    float32 with the kv heads repeated per query group."""
    group = q.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(group, dim=1).transpose(0, 1)
    v = values.float().repeat_interleave(group, dim=1).transpose(0, 1)
    n, total = q.shape[0], keys.shape[0]
    mask = torch.ones(n, total, dtype=torch.bool).tril(diagonal=prefix_len)
    return F.scaled_dot_product_attention(q.float().transpose(0, 1), k, v, attn_mask=mask, scale=scaling).transpose(0, 1)


def make_case(requests, page_size, num_heads, num_kv_heads, dtype, seed, spare_pages=5):
    """requests: [(prefix_len, num_new)]. Returns the pool (NaN outside the prefixes), the requests' page tables
    (drawn from a shuffled pool), their dense keys/values and the step's q/k/v."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    pages_needed = [-(-(p + n) // page_size) for p, n in requests]
    num_pages = sum(pages_needed) + spare_pages
    page_ids = list(range(num_pages))
    rng.shuffle(page_ids)
    tables, it = [], iter(page_ids)
    for count in pages_needed:
        tables.append([next(it) for _ in range(count)])
    shape = (num_pages, page_size, num_kv_heads, HEAD_DIM)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    dense_k, dense_v = [], []
    for (prefix, n), table in zip(requests, tables):
        keys = torch.randn(prefix + n, num_kv_heads, HEAD_DIM, generator=gen).to(dtype)
        values = torch.randn(prefix + n, num_kv_heads, HEAD_DIM, generator=gen).to(dtype)
        for t in range(prefix):  # the cached prefix, written position by position through the page table
            k_cache[table[t // page_size], t % page_size] = keys[t]
            v_cache[table[t // page_size], t % page_size] = values[t]
        dense_k.append(keys)
        dense_v.append(values)
    total_new = sum(n for _, n in requests)
    q = torch.randn(total_new, num_heads, HEAD_DIM, generator=gen).to(dtype)
    k = torch.cat([keys[p:] for keys, (p, _) in zip(dense_k, requests)])
    v = torch.cat([values[p:] for values, (p, _) in zip(dense_v, requests)])
    return k_cache, v_cache, tables, dense_k, dense_v, q, k, v


TOLERANCE = {torch.float32: {"atol": 2e-5, "rtol": 2e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}

MIXED = [(7, 1), (0, 5), (12, 4), (3, 1), (0, 1), (16, 1), (4, 9), (31, 1), (15, 1), (8, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2)])
def test_mixed_batch_matches_dense_reference(dtype, page_size, num_heads, num_kv_heads):
    k_cache, v_cache, tables, dense_k, dense_v, q, k, v = make_case(MIXED, page_size, num_heads, num_kv_heads,
                                                                    dtype, seed=page_size * 10 + num_kv_heads)
    prefix_lens, num_new = [p for p, _ in MIXED], [n for _, n in MIXED]
    meta = PagedAttentionMetadata.build(tables, prefix_lens, num_new, page_size)
    assert meta.decode_rows.numel() == sum(n == 1 for n in num_new)
    assert len(meta.extends) == sum(n > 1 for n in num_new)
    scaling = HEAD_DIM ** -0.5
    out = paged_attention(q, k, v, k_cache, v_cache, meta, scaling, chunk_tokens=13)
    assert out.dtype == dtype and out.shape == q.shape
    row = 0
    for i, (prefix, n) in enumerate(MIXED):
        expected = dense_reference(q[row:row + n], dense_k[i], dense_v[i], prefix, scaling)
        torch.testing.assert_close(out[row:row + n].float(), expected, **TOLERANCE[dtype], msg=f"request {i}")
        for t in range(prefix + n):  # the pool now holds the request's whole sequence, new tokens included
            assert torch.equal(k_cache[tables[i][t // page_size], t % page_size], dense_k[i][t])
            assert torch.equal(v_cache[tables[i][t // page_size], t % page_size], dense_v[i][t])
        row += n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_batch_matches_dense_reference(dtype):
    requests = [(p, 1) for p in [0, 1, 2, 3, 5, 8, 40, 63, 64, 100]]
    page_size = 8
    k_cache, v_cache, tables, dense_k, dense_v, q, k, v = make_case(requests, page_size, 6, 3, dtype, seed=3)
    meta = PagedAttentionMetadata.build(tables, [p for p, _ in requests], [1] * len(requests), page_size)
    assert meta.extends == ()
    out = paged_attention(q, k, v, k_cache, v_cache, meta, 0.3)
    for i, (prefix, _) in enumerate(requests):
        expected = dense_reference(q[i:i + 1], dense_k[i], dense_v[i], prefix, 0.3)
        torch.testing.assert_close(out[i:i + 1].float(), expected, **TOLERANCE[dtype], msg=f"request {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_decode_equals_unchunked(dtype):
    requests = [(p, 1) for p in [30, 2, 17, 0, 45, 9]]
    page_size = 4
    k_cache, v_cache, tables, _, _, q, k, v = make_case(requests, page_size, 8, 2, dtype, seed=11)
    meta = PagedAttentionMetadata.build(tables, [p for p, _ in requests], [1] * len(requests), page_size)
    paged_attention(q, k, v, k_cache, v_cache, meta, 0.25)  # stores the new tokens
    total_keys = meta.decode_key_slots.numel()
    assert total_keys == sum(p + 1 for p, _ in requests)

    def run(chunk):
        return paged_decode_attention(q, k_cache, v_cache, meta.decode_key_slots, meta.decode_key_owner, 0.25, chunk)

    whole = run(total_keys)
    for chunk in [1, 3, 7, 50, total_keys - 1, total_keys + 100]:
        assert torch.equal(run(chunk), whole), f"chunk_tokens={chunk}"


def test_one_token_prefill_takes_the_decode_path():
    requests = [(0, 1), (0, 3)]
    k_cache, v_cache, tables, dense_k, dense_v, q, k, v = make_case(requests, 2, 2, 1, torch.float32, seed=5)
    meta = PagedAttentionMetadata.build(tables, [0, 0], [1, 3], 2)
    assert meta.decode_rows.tolist() == [0]
    out = paged_attention(q, k, v, k_cache, v_cache, meta, 1.0)
    torch.testing.assert_close(out[:1], v[:1].repeat_interleave(2, dim=1))  # a single key: softmax weight 1
    torch.testing.assert_close(out[1:], dense_reference(q[1:], dense_k[1], dense_v[1], 0, 1.0))


def test_metadata_token_slots_by_hand():
    # page_size 4. Request 0: pages [5, 2], 3 cached tokens, 3 new at positions 3, 4, 5.
    # Request 1: page [7], 2 cached, 1 new (decode) at position 2. Request 2: pages [0, 9], 4 cached, 1 new.
    meta = PagedAttentionMetadata.build([[5, 2], [7], [0, 9]], [3, 2, 4], [3, 1, 1], 4)
    assert meta.slot_mapping.tolist() == [5 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1, 7 * 4 + 2, 9 * 4 + 0]
    assert meta.decode_rows.tolist() == [3, 4]
    assert meta.decode_key_slots.tolist() == [28, 29, 30, 0, 1, 2, 3, 36]
    assert meta.decode_key_owner.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    (extend,) = meta.extends
    assert (extend.row_start, extend.num_tokens, extend.prefix_len) == (0, 3, 3)
    assert extend.key_slots.tolist() == [20, 21, 22, 23, 8, 9]


def test_metadata_rejects_a_page_table_too_short():
    with pytest.raises(ValueError, match="request 1: 9 tokens do not fit its 2 pages of 4"):
        PagedAttentionMetadata.build([[0], [1, 2]], [0, 8], [2, 1], 4)


def test_decode_is_stable_for_large_scores():
    # scores in the thousands: exp overflows float32 unless each request's maximum is subtracted first
    requests = [(20, 1), (5, 1)]
    k_cache, v_cache, tables, dense_k, dense_v, q, k, v = make_case(requests, 4, 4, 2, torch.float32, seed=8)
    q = q * 300.0
    meta = PagedAttentionMetadata.build(tables, [20, 5], [1, 1], 4)
    out = paged_attention(q, k, v, k_cache, v_cache, meta, 1.0, chunk_tokens=6)
    assert torch.isfinite(out).all()
    for i, (prefix, _) in enumerate(requests):
        expected = dense_reference(q[i:i + 1], dense_k[i], dense_v[i], prefix, 1.0)
        torch.testing.assert_close(out[i:i + 1], expected, atol=1e-4, rtol=1e-4)
