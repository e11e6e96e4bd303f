"""Paged attention against a dense reference: plain softmax attention in float64 over each request's
contiguous keys/values with the causal mask, for random shuffled non-contiguous page tables, GQA, mixed
decode/prefill/extend batches, fp32 and bf16. The pool starts as NaN, so reading any slot a request does not
own, or a padding slot without masking it, poisons the output. Also: the decode grouping rule, chunked decode
(tiny workspace) against the reference and against one chunk, the reused workspace against fresh tensors,
and the metadata's token slots and decode pages against hand-computed ones."""

import math
import random

import pytest
import torch

from tandem.layers.attention_workspace import AttentionWorkspace
from tandem.layers.paged_attention import decode_chunk_keys, paged_attention
from tandem.layers.paged_metadata import PagedAttentionMetadata

HEAD_DIM = 16
UNBOUNDED = 1 << 30  # chunk_keys large enough that no group is split by the workspace


def dense_reference(q, keys, values, prefix_len, scaling):
    """q [n, Hq, D] at positions prefix_len.., keys/values [prefix_len + n, Hkv, D]: softmax(q k^T * scaling)
    v in float64 with query i seeing keys 0 .. prefix_len + i, the kv heads repeated per query group."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, total, D]
    v = values.double().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q.double().transpose(0, 1) @ k.transpose(1, 2) * scaling  # [Hq, n, total]
    n, total = q.shape[0], keys.shape[0]
    visible = torch.arange(total)[None, :] <= prefix_len + torch.arange(n)[:, None]
    scores = scores.masked_fill(~visible, -math.inf)
    return (torch.softmax(scores, dim=-1) @ v).transpose(0, 1)


def make_case(requests, page_size, num_heads, num_kv_heads, dtype, seed, spare_pages=5):
    """requests: [(prefix_len, num_new)]. Returns the pool [Hkv, pages, page_size, D] (NaN outside the
    prefixes), the requests' page tables (drawn from a shuffled pool), their dense keys/values and the step's
    q/k/v."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    pages_needed = [-(-(p + n) // page_size) for p, n in requests]
    num_pages = sum(pages_needed) + spare_pages
    page_ids = list(range(num_pages))
    rng.shuffle(page_ids)
    tables, it = [], iter(page_ids)
    for count in pages_needed:
        tables.append([next(it) for _ in range(count)])
    shape = (num_kv_heads, num_pages, page_size, HEAD_DIM)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    dense_k, dense_v = [], []
    for (prefix, n), table in zip(requests, tables):
        keys = torch.randn(prefix + n, num_kv_heads, HEAD_DIM, generator=gen).to(dtype)
        values = torch.randn(prefix + n, num_kv_heads, HEAD_DIM, generator=gen).to(dtype)
        for t in range(prefix):  # the cached prefix, written position by position through the page table
            k_cache[:, table[t // page_size], t % page_size] = keys[t]
            v_cache[:, table[t // page_size], t % page_size] = values[t]
        dense_k.append(keys)
        dense_v.append(values)
    total_new = sum(n for _, n in requests)
    q = torch.randn(total_new, num_heads, HEAD_DIM, generator=gen).to(dtype)
    k = torch.cat([keys[p:] for keys, (p, _) in zip(dense_k, requests)])
    v = torch.cat([values[p:] for values, (p, _) in zip(dense_v, requests)])
    return k_cache, v_cache, tables, dense_k, dense_v, q, k, v


def build(tables, requests, page_size, chunk_keys):
    return PagedAttentionMetadata.build(tables, [p for p, _ in requests], [n for _, n in requests], page_size,
                                        chunk_keys)


def assert_matches_reference(out, q, requests, dense_k, dense_v, scaling, dtype, **tolerance):
    tolerance = tolerance or TOLERANCE[dtype]
    row = 0
    for i, (prefix, n) in enumerate(requests):
        expected = dense_reference(q[row:row + n], dense_k[i], dense_v[i], prefix, scaling)
        torch.testing.assert_close(out[row:row + n].double(), expected, **tolerance, msg=f"request {i}")
        row += n


TOLERANCE = {torch.float32: {"atol": 2e-5, "rtol": 2e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}

MIXED = [(7, 1), (0, 5), (12, 4), (3, 1), (0, 1), (16, 1), (4, 9), (31, 1), (15, 1), (8, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("chunk_keys", [UNBOUNDED, 13])
def test_mixed_batch_matches_dense_reference(dtype, page_size, num_heads, num_kv_heads, chunk_keys):
    k_cache, v_cache, tables, dense_k, dense_v, q, k, v = make_case(MIXED, page_size, num_heads, num_kv_heads,
                                                                    dtype, seed=page_size * 10 + num_kv_heads)
    meta = build(tables, MIXED, page_size, chunk_keys)
    assert meta.num_decode_rows == sum(n == 1 for _, n in MIXED)
    assert len(meta.extends) == sum(n > 1 for _, n in MIXED)
    scaling = HEAD_DIM ** -0.5
    out = paged_attention(q, k, v, k_cache, v_cache, meta, scaling, AttentionWorkspace(1 << 20))
    assert out.dtype == dtype and out.shape == q.shape
    assert_matches_reference(out, q, MIXED, dense_k, dense_v, scaling, dtype)
    for i, (prefix, n) in enumerate(MIXED):
        for t in range(prefix + n):  # the pool now holds the request's whole sequence, new tokens included
            assert torch.equal(k_cache[:, tables[i][t // page_size], t % page_size], dense_k[i][t])
            assert torch.equal(v_cache[:, tables[i][t // page_size], t % page_size], dense_v[i][t])


# lengths 1 .. 301 with page_size 8: several groups under the half-pages rule
VARIED = [(p, 1) for p in [0, 1, 2, 3, 5, 8, 40, 63, 64, 100, 7, 300, 150, 151, 33, 17, 260]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_keys", [UNBOUNDED, 200, 8, 1])
def test_decode_batch_of_varied_lengths_matches_dense_reference(dtype, chunk_keys):
    page_size = 8
    k_cache, v_cache, tables, dense_k, dense_v, q, k, v = make_case(VARIED, page_size, 6, 3, dtype, seed=3)
    meta = build(tables, VARIED, page_size, chunk_keys)
    assert meta.extends == () and meta.num_decode_rows == len(VARIED) and len(meta.decode_groups) > 1
    for group in meta.decode_groups:
        for chunk in group.chunks:  # every chunk within its key budget, or a single page of a single request
            assert chunk.key_mask.numel() <= chunk_keys or chunk.key_mask.shape == (1, page_size)
    if chunk_keys < 300:
        assert any(len(group.chunks) > 1 for group in meta.decode_groups)
    out = paged_attention(q, k, v, k_cache, v_cache, meta, 0.3, AttentionWorkspace(1 << 20))
    assert_matches_reference(out, q, VARIED, dense_k, dense_v, 0.3, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_does_not_depend_on_grouping(dtype):
    page_size = 4
    k_cache, v_cache, tables, _, _, q, k, v = make_case(VARIED, page_size, 8, 2, dtype, seed=11)
    whole = paged_attention(q, k, v, k_cache, v_cache, build(tables, VARIED, page_size, UNBOUNDED), 0.25)
    for chunk_keys in [1, 3, 7, 50, 400, 2000]:
        meta = build(tables, VARIED, page_size, chunk_keys)
        out = paged_attention(q, k, v, k_cache, v_cache, meta, 0.25)
        # bf16: the chunked path rounds each chunk's weighted values to bf16 before summing them
        tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
        torch.testing.assert_close(out, whole, **tolerance, msg=f"chunk_keys={chunk_keys}")


def test_the_grouping_rule_by_hand():
    # page_size 4; decode lengths are prefix + 1. Sorted longest first: 40 (10 pages), 21 (6 pages), 20 (5),
    # 17 (5), 9 (3), 5 (2), 4 (1), 1 (1). Half-pages rule: 6 and 5 >= 10 / 2 join the 10-page group; 3 < 5
    # starts a group of 3 pages, which 2 joins; 1 < 1.5 starts a group of 1 page.
    prefixes = [3, 39, 16, 8, 0, 20, 19, 4]
    tables = [list(range(10 * i, 10 * i + 10)) for i in range(len(prefixes))]
    requests = [(p, 1) for p in prefixes]

    def groups(chunk_keys):
        meta = build(tables, requests, 4, chunk_keys)
        return [group.rows.tolist() for group in meta.decode_groups]

    assert groups(UNBOUNDED) == [[1, 5, 6, 2], [3, 7], [0, 4]]
    # 80 key slots: the 10-page group holds two requests (2 x 40 keys); the next group starts at 5 pages (20
    # keys) and holds three (60 keys); 2 pages < 5 / 2 starts the last
    assert groups(80) == [[1, 5], [6, 2, 3], [7, 0, 4]]
    # 30 key slots: request 1 alone (its 40 keys are chunked), then [5 (24 keys)], [6 and 2: 2 x 20 > 30]
    assert groups(30) == [[1], [5], [6], [2], [3, 7], [0, 4]]


def test_a_long_request_is_chunked_by_whole_pages():
    meta = PagedAttentionMetadata.build([[4, 2, 7, 1, 0]], [17], [1], 4, 9)  # 18 keys in 5 pages, 2 per chunk
    (group,) = meta.decode_groups
    assert [chunk.page_ids.tolist() for chunk in group.chunks] == [[4, 2], [7, 1], [0]]
    assert [chunk.key_mask.sum().item() for chunk in group.chunks] == [8, 8, 2]
    assert group.chunks[-1].pad_slots.tolist() == [2, 3]
    assert group.chunks[0].pad_slots.numel() == 0


def test_decode_pages_and_padding_by_hand():
    # page_size 4. Request 0: pages [5, 2], 5 cached + 1 new = 6 keys. Request 1: page [7], 2 keys.
    meta = PagedAttentionMetadata.build([[5, 2], [7]], [5, 1], [1, 1], 4, UNBOUNDED)
    (group,) = meta.decode_groups  # 1 page >= 2 / 2: one group, padded to 2 pages with request 1's last page
    assert group.rows.tolist() == [0, 1]
    (chunk,) = group.chunks
    assert chunk.page_ids.tolist() == [5, 2, 7, 7]
    assert chunk.key_mask.tolist() == [[True] * 6 + [False] * 2, [True] * 2 + [False] * 6]
    assert chunk.pad_slots.tolist() == [6, 7, 10, 11, 12, 13, 14, 15]


def test_reused_workspace_equals_fresh_tensors_across_growing_steps():
    page_size = 4
    workspace = AttentionWorkspace(1 << 20)
    for step, prefixes in enumerate([[3, 1], [30, 20, 9], [2], [61, 64, 70, 40]]):
        requests = [(p, 1) for p in prefixes]
        k_cache, v_cache, tables, _, _, q, k, v = make_case(requests, page_size, 4, 2, torch.bfloat16, seed=step)
        meta = build(tables, requests, page_size, UNBOUNDED)
        fresh = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, 0.25)
        reused = paged_attention(q, k, v, k_cache, v_cache, meta, 0.25, workspace)
        assert torch.equal(reused, fresh), f"step {step}"
    assert 0 < workspace.nbytes <= 2 << 20


def test_workspace_grows_by_doubling_up_to_its_limit():
    workspace = AttentionWorkspace(max_bytes=1000)
    assert workspace.view("keys", (10,), torch.float32, "cpu").shape == (10,)
    assert workspace.nbytes == 40
    workspace.view("keys", (12,), torch.float32, "cpu")  # doubles to 20 elements
    assert workspace.nbytes == 80
    workspace.view("keys", (200,), torch.float32, "cpu")  # 40 would not do: exactly what is asked
    assert workspace.nbytes == 800
    workspace.view("keys", (240,), torch.float32, "cpu")  # doubling capped at 1000 bytes = 250 elements
    assert workspace.nbytes == 1000
    workspace.view("values", (3,), torch.bfloat16, "cpu")
    assert workspace.nbytes == 1006


def test_chunk_keys_fit_the_workspace():
    chunk = decode_chunk_keys(1 << 20, num_q_heads=8, num_kv_heads=4, head_dim=64, cache_dtype=torch.bfloat16)
    per_key = 2 * 4 * 64 * 2 + 8 * (2 * 2 + 8)  # keys + values, then scores bf16 + fp32, probs fp32 + bf16
    assert chunk == (1 << 20) // per_key
    assert decode_chunk_keys(10, 8, 4, 64, torch.float32) == 1


def test_one_token_prefill_takes_the_decode_path():
    requests = [(0, 1), (0, 3)]
    k_cache, v_cache, tables, dense_k, dense_v, q, k, v = make_case(requests, 2, 2, 1, torch.float32, seed=5)
    meta = build(tables, requests, 2, UNBOUNDED)
    assert [group.rows.tolist() for group in meta.decode_groups] == [[0]]
    out = paged_attention(q, k, v, k_cache, v_cache, meta, 1.0)
    torch.testing.assert_close(out[:1], v[:1].repeat_interleave(2, dim=1))  # a single key: softmax weight 1
    assert_matches_reference(out, q, requests, dense_k, dense_v, 1.0, torch.float32)


def test_metadata_token_slots_by_hand():
    # page_size 4. Request 0: pages [5, 2], 3 cached tokens, 3 new at positions 3, 4, 5.
    # Request 1: page [7], 2 cached, 1 new (decode) at position 2. Request 2: pages [0, 9], 4 cached, 1 new.
    meta = PagedAttentionMetadata.build([[5, 2], [7], [0, 9]], [3, 2, 4], [3, 1, 1], 4, UNBOUNDED)
    assert meta.slot_mapping.tolist() == [5 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1, 7 * 4 + 2, 9 * 4 + 0]
    (group,) = meta.decode_groups  # request 2 (2 pages) first, then request 1 (1 page)
    assert group.rows.tolist() == [4, 3]
    assert group.chunks[0].page_ids.tolist() == [0, 9, 7, 7]
    (extend,) = meta.extends
    assert (extend.row_start, extend.num_tokens, extend.prefix_len) == (0, 3, 3)
    assert extend.key_slots.tolist() == [20, 21, 22, 23, 8, 9]


def test_metadata_rejects_a_page_table_too_short():
    with pytest.raises(ValueError, match="request 1: 9 tokens do not fit its 2 pages of 4"):
        PagedAttentionMetadata.build([[0], [1, 2]], [0, 8], [2, 1], 4, UNBOUNDED)


@pytest.mark.parametrize("chunk_keys", [UNBOUNDED, 4])
def test_decode_is_stable_for_large_scores(chunk_keys):
    # scores in the thousands: exp overflows float32 unless each request's maximum is subtracted first
    requests = [(20, 1), (5, 1)]
    k_cache, v_cache, tables, dense_k, dense_v, q, k, v = make_case(requests, 4, 4, 2, torch.float32, seed=8)
    q = q * 300.0
    meta = build(tables, requests, 4, chunk_keys)
    out = paged_attention(q, k, v, k_cache, v_cache, meta, 1.0)
    assert torch.isfinite(out).all()
    assert_matches_reference(out, q, requests, dense_k, dense_v, 1.0, torch.float32, atol=1e-4, rtol=1e-4)
