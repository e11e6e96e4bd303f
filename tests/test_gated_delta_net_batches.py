"""A GatedDeltaNet layer's batched paths at any state slots: `StateRows` against plain advanced indexing; the
batched decode (recurrent rule, states read and written through `StateRows`) against the same rows run through
the prefill path (chunked rule and prefill conv) on the same pool contents; a step mixing prefill spans of
several lengths with decodes (at scattered slots) against each span run alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tandem.layers.forward_batch import ForwardBatch
from tandem.layers.gated_delta_net import GatedDeltaNet
from tandem.layers.span import Span
from tandem.layers.state_rows import StateRows
from tandem.parallel.layout import GroupInfo
from tandem.runtime.memory.state_pool import LinearStatePool

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


def filled_pool(layer: GatedDeltaNet, seed: int) -> LinearStatePool:
    pool = LinearStatePool([0], 10, layer.conv_channels, CONFIG.linear_conv_kernel_dim, layer.num_v_heads,
                           layer.head_k_dim, layer.head_v_dim, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(seed)
    pool.conv.copy_(torch.randn(pool.conv.shape, generator=gen))
    pool.recurrent.copy_(0.3 * torch.randn(pool.recurrent.shape, generator=gen))
    return pool


def run_layer(layer: GatedDeltaNet, pool: LinearStatePool, spans: list[Span], x: torch.Tensor):
    """One forward step of `spans` over a copy of `pool`: (batch, output, the copy)."""
    pool_copy = filled_pool(layer, seed=0)
    pool_copy.conv.copy_(pool.conv)
    pool_copy.recurrent.copy_(pool.recurrent)
    batch = ForwardBatch.build(spans, [0] * x.shape[0])
    batch.state_pool = pool_copy
    with torch.no_grad():
        out = layer(x, batch)
    return batch, out, pool_copy


def test_mixed_step_equals_each_span_alone():
    layer = gated_delta_net()
    pool = filled_pool(layer, seed=2)
    # (slot, cached tokens, new tokens): prefill chunks of 1 and 2 chunks' worth, a continuation, two decodes
    spans = [Span(6, 0, 70), Span(2, 0, 5), Span(9, 12, 1), Span(0, 0, 64), Span(4, 3, 40), Span(3, 30, 1),
             Span(7, 0, 130)]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(sum(s.num_tokens for s in spans), CONFIG.hidden_size, generator=gen)
    _, together, together_pool = run_layer(layer, pool, spans, x)
    alone_pool = filled_pool(layer, seed=0)
    alone_pool.conv.copy_(pool.conv)
    alone_pool.recurrent.copy_(pool.recurrent)
    offset = 0
    for span in spans:
        rows = slice(offset, offset + span.num_tokens)
        _, alone, one_pool = run_layer(layer, pool, [span], x[rows])
        torch.testing.assert_close(together[rows], alone, atol=1e-5, rtol=1e-5)
        for name in ("conv", "recurrent"):
            getattr(alone_pool, name)[:, span.state_slot] = getattr(one_pool, name)[:, span.state_slot]
        offset += span.num_tokens
    torch.testing.assert_close(together_pool.conv, alone_pool.conv, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(together_pool.recurrent, alone_pool.recurrent, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together_pool.recurrent, pool.recurrent)


@pytest.mark.parametrize("slots", [[3, 4, 5, 6], [5, 3, 6, 4], [7, 0, 1, 9, 8]], ids=["in order", "permuted", "runs"])
def test_batched_decode_at_any_slots_matches_the_prefill_path(slots):
    layer = gated_delta_net()
    pool = filled_pool(layer, seed=1)
    x = torch.randn(len(slots), CONFIG.hidden_size, generator=torch.Generator().manual_seed(4))

    def run(prefix_len: int):
        spans = [Span(slot, prefix_len, 1) for slot in slots]
        batch, out, pool_copy = run_layer(layer, pool, spans, x)
        return batch, out, pool_copy

    decode_batch, decoded, decode_pool = run(prefix_len=5)  # one-token continuations: the batched decode
    prefill_batch, prefilled, prefill_pool = run(prefix_len=0)  # one-token prompts: the prefill path
    assert decode_batch.is_decode and not prefill_batch.decode_spans
    torch.testing.assert_close(decoded, prefilled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decode_pool.conv, prefill_pool.conv, atol=0, rtol=0)
    torch.testing.assert_close(decode_pool.recurrent, prefill_pool.recurrent, atol=1e-5, rtol=1e-5)
    untouched = [s for s in range(10) if s not in slots]
    assert torch.equal(decode_pool.recurrent[:, untouched], pool.recurrent[:, untouched])
    assert not torch.allclose(decode_pool.recurrent[:, slots], pool.recurrent[:, slots])
