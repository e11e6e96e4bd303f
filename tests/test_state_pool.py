"""The linear-attention state slot pool: per-slot byte formula vs. tensor bytes, dtypes, per-layer views,
reset of chosen slots, and copy (snapshot / restore) against a clone of the pool taken beforehand."""

import pytest
import torch

from tandem.runtime.memory.state_pool import LinearStatePool


def make(dtype=torch.bfloat16, slots=4):
    # 3 linear-attention layers, 12 conv channels, kernel 4, 2 value heads, key dim 3, value dim 5
    return LinearStatePool([0, 2, 5], slots, 12, 4, 2, 3, 5, dtype, "cpu")


def filled(slots=4):
    pool = make(slots=slots)
    gen = torch.Generator().manual_seed(0)
    pool.conv.copy_(torch.randn(pool.conv.shape, generator=gen))
    pool.recurrent.copy_(torch.randn(pool.recurrent.shape, generator=gen))
    return pool


def test_bytes_per_slot_matches_the_pool_tensors():
    # per layer and slot: conv 12 x 3 x 2 bytes = 72, recurrent 2 x 3 x 5 x 4 bytes = 120; 3 layers -> 576
    assert LinearStatePool.bytes_per_slot(3, 12, 4, 2, 3, 5, torch.bfloat16) == 576
    pool = make()
    assert pool.conv.shape == (3, 4, 3, 12) and pool.conv.dtype == torch.bfloat16
    assert pool.recurrent.shape == (3, 4, 2, 3, 5) and pool.recurrent.dtype == torch.float32
    assert pool.nbytes == 4 * 576 == pool.conv.nbytes + pool.recurrent.nbytes
    empty = LinearStatePool([], 4, 12, 4, 2, 3, 5, torch.bfloat16, "cpu")
    assert empty.nbytes == 0 == LinearStatePool.bytes_per_slot(0, 12, 4, 2, 3, 5, torch.bfloat16)


def test_layer_views_alias_the_pool():
    pool = make()
    conv, recurrent = pool.layer(5)
    conv[1] = 2.0
    recurrent[3] = -1.0
    assert torch.all(pool.conv[2, 1] == 2.0) and torch.all(pool.recurrent[2, 3] == -1.0)
    assert torch.all(pool.conv[:2] == 0)
    with pytest.raises(KeyError):
        pool.layer(1)


def test_reset_zeroes_only_the_given_slots():
    pool = filled()
    before_conv, before_rec = pool.conv.clone(), pool.recurrent.clone()
    pool.reset([3, 1])
    assert torch.all(pool.conv[:, [1, 3]] == 0) and torch.all(pool.recurrent[:, [1, 3]] == 0)
    assert torch.equal(pool.conv[:, [0, 2]], before_conv[:, [0, 2]])
    assert torch.equal(pool.recurrent[:, [0, 2]], before_rec[:, [0, 2]])
    pool.reset([])
    assert torch.equal(pool.conv[:, 0], before_conv[:, 0])


def test_copy_snapshots_and_restores_in_every_layer():
    pool = filled(slots=5)
    conv, rec = pool.conv.clone(), pool.recurrent.clone()
    pool.copy([0, 2], [4, 3])
    for src, dst in [(0, 4), (2, 3)]:
        assert torch.equal(pool.conv[:, dst], conv[:, src]) and torch.equal(pool.recurrent[:, dst], rec[:, src])
    assert torch.equal(pool.conv[:, :3], conv[:, :3]) and torch.equal(pool.recurrent[:, :3], rec[:, :3])


def test_copy_reads_all_sources_before_writing():
    pool = filled()
    conv, rec = pool.conv.clone(), pool.recurrent.clone()
    pool.copy([0, 1], [1, 0])  # a swap
    assert torch.equal(pool.conv[:, 0], conv[:, 1]) and torch.equal(pool.conv[:, 1], conv[:, 0])
    assert torch.equal(pool.recurrent[:, 0], rec[:, 1]) and torch.equal(pool.recurrent[:, 1], rec[:, 0])


def test_copy_and_reset_reject_bad_slots():
    pool = make()
    with pytest.raises(ValueError, match="2 source slots into 1"):
        pool.copy([0, 1], [2])
    with pytest.raises(ValueError, match="repeat"):
        pool.copy([0, 1], [2, 2])
    with pytest.raises(IndexError, match="out of range"):
        pool.copy([4], [0])
    with pytest.raises(IndexError, match="out of range"):
        pool.reset([-1])
