"""Gated DeltaNet decode rows at any state slots: `StateRows` against plain advanced indexing, and a
GatedDeltaNet layer's batched decode (recurrent rule, states read and written through `StateRows`) against
the same rows run through its prefill path (chunked rule and prefill conv, one span at a time) on the same
pool contents."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tandem.layers.forward_batch import ForwardBatch, Span
from tandem.layers.gated_delta_net import GatedDeltaNet
from tandem.layers.state_rows import StateRows
from tandem.parallel.layout import GroupInfo
from tandem.runtime.state_pool import LinearStatePool

SLOT_LISTS = {
    "one run in order": [3, 4, 5, 6],
    "one run permuted": [5, 3, 6, 4],
    "several runs": [7, 0, 1, 9, 8],
    "scattered": [9, 2, 5, 0],
    "single row": [4],
}


@pytest.mark.parametrize("slots", SLOT_LISTS.values(), ids=SLOT_LISTS.keys())
def test_rows_read_update_and_write_back_like_advanced_indexing(slots):
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(10, 3, 4, generator=gen)
    expected = pool.clone()
    rows = StateRows(slots, "cpu")
    assert rows.is_slice == (sorted(slots) == list(range(min(slots), min(slots) + len(slots))))

    order = sorted(range(len(slots)), key=slots.__getitem__)
    per_row = torch.randn(len(slots), 3, 4, generator=gen)  # something each caller row adds to its state
    (in_slot_order,) = rows.to_slot_order(per_row)
    assert torch.equal(in_slot_order, per_row[order])

    state = rows.read(pool)
    assert torch.equal(state, expected[sorted(slots)])
    state.add_(in_slot_order)
    rows.write(pool, state)
    expected[slots] += per_row
    assert torch.equal(pool, expected)
    assert torch.equal(rows.from_slot_order(state), expected[slots])


CONFIG = SimpleNamespace(hidden_size=32, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                         linear_num_value_heads=4, linear_conv_kernel_dim=4, rms_norm_eps=1e-6)


def gated_delta_net() -> GatedDeltaNet:
    torch.manual_seed(0)
    layer = GatedDeltaNet(GroupInfo.alone(), CONFIG, layer_idx=0)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn(param.shape) * 0.3)
    return layer


@pytest.mark.parametrize("slots", [[3, 4, 5, 6], [5, 3, 6, 4], [7, 0, 1, 9, 8]], ids=["in order", "permuted", "runs"])
def test_batched_decode_at_any_slots_matches_the_prefill_path(slots):
    layer = gated_delta_net()
    pool = LinearStatePool([0], 10, layer.conv_channels, CONFIG.linear_conv_kernel_dim, layer.num_v_heads,
                           layer.head_k_dim, layer.head_v_dim, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(1)
    pool.conv.copy_(torch.randn(pool.conv.shape, generator=gen))
    pool.recurrent.copy_(0.3 * torch.randn(pool.recurrent.shape, generator=gen))
    x = torch.randn(len(slots), CONFIG.hidden_size, generator=gen)

    def run(prefix_len: int):
        pool_copy = LinearStatePool([0], 10, layer.conv_channels, CONFIG.linear_conv_kernel_dim, layer.num_v_heads,
                                    layer.head_k_dim, layer.head_v_dim, torch.float32, "cpu")
        pool_copy.conv.copy_(pool.conv)
        pool_copy.recurrent.copy_(pool.recurrent)
        spans = [Span(slot, prefix_len, 1) for slot in slots]
        batch = ForwardBatch.build(spans, [0] * len(slots))
        batch.state_pool = pool_copy
        with torch.no_grad():
            out = layer(x, batch)
        return batch, out, pool_copy

    decode_batch, decoded, decode_pool = run(prefix_len=5)  # one-token continuations: the batched decode
    prefill_batch, prefilled, prefill_pool = run(prefix_len=0)  # one-token prompts: each span on its own
    assert decode_batch.is_decode and not prefill_batch.decode_spans
    torch.testing.assert_close(decoded, prefilled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decode_pool.conv, prefill_pool.conv, atol=0, rtol=0)
    torch.testing.assert_close(decode_pool.recurrent, prefill_pool.recurrent, atol=1e-5, rtol=1e-5)
    untouched = [s for s in range(10) if s not in slots]
    assert torch.equal(decode_pool.recurrent[:, untouched], pool.recurrent[:, untouched])
    assert not torch.allclose(decode_pool.recurrent[:, slots], pool.recurrent[:, slots])
