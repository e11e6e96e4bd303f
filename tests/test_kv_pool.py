"""The paged KV pool (byte formula vs. real tensor bytes, per-layer views), the sizing from memory against
hand-computed numbers, and the id allocator's invariants (nothing handed out twice, frees come back)."""

import random

import pytest
import torch

from tandem.runtime.memory.kv_pool import PagedKVPool, max_total_tokens_from_memory
from tandem.runtime.scheduling.id_allocator import IdAllocator


@pytest.mark.parametrize("dtype,expected_per_token", [(torch.bfloat16, 2 * 3 * 2 * 8 * 2),
                                                      (torch.float32, 2 * 3 * 2 * 8 * 4)])
def test_bytes_per_token_matches_the_pool_tensors(dtype, expected_per_token):
    pool = PagedKVPool([3, 7, 11], num_pages=5, page_size=4, kv_heads=2, head_dim=8, dtype=dtype, device="cpu")
    per_token = PagedKVPool.bytes_per_token(3, 2, 8, dtype)
    assert per_token == expected_per_token
    assert pool.max_total_tokens == 20
    assert pool.nbytes == 20 * per_token == pool.k.nbytes + pool.v.nbytes
    assert pool.k.shape == (3, 2, 5, 4, 8) and pool.k.dtype == dtype  # [layers, kv_heads, pages, page_size, D]


def test_layer_views_alias_the_pool_and_only_own_layers_exist():
    pool = PagedKVPool([4, 9], num_pages=3, page_size=2, kv_heads=1, head_dim=4, dtype=torch.float32, device="cpu")
    k, v = pool.layer(9)
    assert k.shape == (1, 3, 2, 4)
    k[0, 2, 1] = 5.0
    v[0, 0, 0] = -1.0
    assert torch.all(pool.k[1, 0, 2, 1] == 5.0) and torch.all(pool.v[1, 0, 0, 0] == -1.0)
    assert torch.all(pool.k[0] == 0)
    with pytest.raises(KeyError):
        pool.layer(5)


def test_a_stage_without_attention_layers_holds_nothing():
    pool = PagedKVPool([], num_pages=8, page_size=4, kv_heads=2, head_dim=8, dtype=torch.bfloat16, device="cpu")
    assert pool.nbytes == 0 == PagedKVPool.bytes_per_token(0, 2, 8, torch.bfloat16)


def test_sizing_from_memory_by_hand():
    # 0.5 x 10,000,000 = 5,000,000 - 1,000,000 weights - 500,000 reserve = 3,500,000 bytes. A page of 16 tokens
    # x 192 bytes = 3,072 bytes; 3,500,000 // 3,072 = 1,139 pages (1,139 x 3,072 = 3,499,008) = 18,224 tokens.
    assert max_total_tokens_from_memory(10_000_000, 0.5, 1_000_000, 500_000, 192, 16) == 18_224
    # page_size 1: 3,500,000 // 192 = 18,229 tokens
    assert max_total_tokens_from_memory(10_000_000, 0.5, 1_000_000, 500_000, 192, 1) == 18_229
    # A Qwen3.5-like stage: 10 full-attention layers, 2 kv heads of 256, bf16 -> 20,480 bytes per token.
    # 80 GiB x 0.85 = 73,014,444,032 (floored) - 35 GiB weights - 2 GiB reserve = 33,285,996,544 bytes;
    # pages of 64 tokens = 1,310,720 bytes: 25,395 pages (33,285,734,400 bytes) = 1,625,280 tokens.
    per_token = PagedKVPool.bytes_per_token(10, 2, 256, torch.bfloat16)
    assert per_token == 20_480
    assert max_total_tokens_from_memory(80 << 30, 0.85, 35 << 30, 2 << 30, per_token, 64) == 1_625_280


def test_sizing_refuses_less_than_one_page():
    # 0.5 x 1,000,000 - 400,000 - 90,000 = 10,000 bytes < one page of 64 x 192 = 12,288 bytes
    with pytest.raises(ValueError, match=r"leaves 10000 bytes, less than one page of 64 tokens x 192 bytes"):
        max_total_tokens_from_memory(1_000_000, 0.5, 400_000, 90_000, 192, 64)
    with pytest.raises(ValueError, match="leaves -100000 bytes"):
        max_total_tokens_from_memory(1_000_000, 0.5, 600_000, 0, 192, 1)
    with pytest.raises(ValueError, match="mem_fraction_static"):
        max_total_tokens_from_memory(1_000_000, 1.5, 0, 0, 192, 1)
    with pytest.raises(ValueError, match="bytes_per_token"):
        max_total_tokens_from_memory(1_000_000, 0.5, 0, 0, 0, 1)


def test_allocator_hands_out_each_id_once_and_frees_return_them():
    alloc = IdAllocator(6)
    first = alloc.alloc(4)
    assert first == [0, 1, 2, 3] and alloc.num_free == 2 and alloc.num_used == 4
    assert alloc.alloc(3) is None and alloc.num_free == 2  # all or nothing
    second = alloc.alloc(2)
    assert second == [4, 5] and alloc.num_free == 0
    assert alloc.alloc(1) is None
    assert alloc.alloc(0) == []
    alloc.free([2, 0])
    assert alloc.num_free == 2 and not alloc.is_allocated(2) and alloc.is_allocated(1)
    assert alloc.alloc(2) == [2, 0]  # freed ids come back, oldest free first


def test_allocator_rejects_double_and_stray_frees_without_changing_state():
    alloc = IdAllocator(4, what="state slot")
    alloc.alloc(2)
    alloc.free([1])
    with pytest.raises(ValueError, match=r"state slot ids \[1\] are not allocated"):
        alloc.free([0, 1])
    assert alloc.is_allocated(0) and alloc.num_free == 3  # the valid id of the failed call stayed allocated
    with pytest.raises(ValueError, match="freed twice"):
        alloc.free([0, 0])
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free([9])
    alloc.reset()
    assert alloc.num_free == 4 and alloc.alloc(4) == [0, 1, 2, 3]


def test_allocator_random_sequence_keeps_ids_disjoint():
    rng = random.Random(0)
    alloc = IdAllocator(50)
    held: list[list[int]] = []
    for _ in range(500):
        if held and rng.random() < 0.45:
            alloc.free(held.pop(rng.randrange(len(held))))
        else:
            n = rng.randint(1, 12)
            free_before = alloc.num_free
            got = alloc.alloc(n)
            if got is None:
                assert free_before < n and alloc.num_free == free_before
            else:
                held.append(got)
        owned = [i for ids in held for i in ids]
        assert len(owned) == len(set(owned)) == alloc.num_used
        assert alloc.num_free + alloc.num_used == 50
        assert all(0 <= i < 50 and alloc.is_allocated(i) for i in owned)


def test_allocator_reuses_freed_ids_first_and_keeps_no_list_of_unused_ones():
    alloc = IdAllocator(10**12)  # a list of the free ids would not fit in memory
    assert alloc.num_free == 10**12 and alloc.alloc(3) == [0, 1, 2]
    alloc.free([1])
    assert alloc.alloc(2) == [1, 3]  # the freed id again before an untouched one
    assert alloc.num_used == 4 and alloc.num_free == 10**12 - 4
