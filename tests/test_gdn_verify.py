"""Gated DeltaNet verify spans (speculative decoding): a step mixing verify spans of several lengths (a request's
last token plus its drafts) with plain decodes and prefills, at scattered state slots, leaves the verify slots
untouched; committing accepted length j then leaves each slot's conv and recurrent state equal to what j+1
plain decode steps of that request alone leave (fp32; dyadic weights make the projections exact, so the conv
state is bitwise equal; the recurrent state within 1e-6, as CPU exp/sigmoid round a row differently by its
place in a vector), for every j, and the verify outputs equal
the plain decodes' outputs position by position. Also the ledger's refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from tandem.layers.forward_batch import ForwardBatch
from tandem.layers.gated_delta_net import GatedDeltaNet, commit_verified
from tandem.layers.gdn_verify import VerifyLedger
from tandem.layers.span import Span
from tandem.parallel.layout import GroupInfo
from tandem.runtime.memory.state_pool import LinearStatePool

CONFIG = SimpleNamespace(hidden_size=32, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                         linear_num_value_heads=4, linear_conv_kernel_dim=4, rms_norm_eps=1e-6)
LAYERS = (1, 5)  # global layer indices of the stage's two Gated-DeltaNet layers
NUM_SLOTS = 12


def dyadic(t: torch.Tensor) -> torch.Tensor:
    """Multiples of 1/16: every product and sum in the projections is exact in fp32, so a projection gives the
    same bits whatever the number of rows (GEMM blocking) and the states can be compared bitwise."""
    return torch.round(t * 16) / 16


def stage_layers() -> nn.ModuleList:
    torch.manual_seed(0)
    layers = nn.ModuleList(GatedDeltaNet(GroupInfo.alone(), CONFIG, layer_idx=i) for i in LAYERS)
    with torch.no_grad():
        for param in layers.parameters():
            param.copy_(dyadic(torch.randn(param.shape) * 0.3))
    return layers


def filled_pool(layer: GatedDeltaNet, seed: int) -> LinearStatePool:
    pool = LinearStatePool(list(LAYERS), NUM_SLOTS, layer.conv_channels, CONFIG.linear_conv_kernel_dim,
                           layer.num_v_heads, layer.head_k_dim, layer.head_v_dim, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(seed)
    pool.conv.copy_(torch.randn(pool.conv.shape, generator=gen))
    pool.recurrent.copy_(0.3 * torch.randn(pool.recurrent.shape, generator=gen))
    return pool


def copy_of(pool: LinearStatePool, layer: GatedDeltaNet) -> LinearStatePool:
    out = filled_pool(layer, seed=0)
    out.conv.copy_(pool.conv)
    out.recurrent.copy_(pool.recurrent)
    return out


def run(layers, pool, spans, x, verify=(), ledger=None) -> list[torch.Tensor]:
    """One step of `spans` through each layer (each layer fed x: the layers are not chained here)."""
    batch = ForwardBatch.build(spans, [0] * x.shape[0], verify=verify, verify_ledger=ledger)
    batch.state_pool = pool
    with torch.no_grad():
        return [layer(x, batch) for layer in layers]


# (slot, cached tokens, drafts): verify spans at scattered slots, two of them adjacent, of three lengths
VERIFIES = [(9, 14, 3), (2, 7, 3), (6, 30, 1), (3, 5, 3), (4, 11, 0)]
OTHERS = [Span(0, 20, 1), Span(11, 0, 9), Span(7, 16, 1), Span(10, 3, 5)]  # decodes and prefills in the step


def mixed_step():
    spans = [Span(slot, cached, drafts + 1) for slot, cached, drafts in VERIFIES]
    spans = [spans[0], OTHERS[0], spans[1], OTHERS[1], spans[2], OTHERS[2], spans[3], OTHERS[3], spans[4]]
    verify = [i for i, s in enumerate(spans) if s.state_slot in {v[0] for v in VERIFIES}]
    x = dyadic(torch.randn(sum(s.num_tokens for s in spans), CONFIG.hidden_size,
                           generator=torch.Generator().manual_seed(5)))
    return spans, verify, x


def rows_of(spans, x):
    out, offset = {}, 0
    for span in spans:
        out[span.state_slot] = x[offset:offset + span.num_tokens]
        offset += span.num_tokens
    return out


@pytest.mark.parametrize("order", ["forward", "reversed"])
@pytest.mark.parametrize("shift", range(4), ids=lambda s: f"accepted-shift-{s}")
def test_commit_at_the_accepted_length_equals_those_tokens_decoded_alone(shift, order):
    layers = stage_layers()
    pool = filled_pool(layers[0], seed=2)
    spans, verify, x = mixed_step()
    ledger = VerifyLedger()
    stepped = copy_of(pool, layers[0])
    outs = run(layers, stepped, spans, x, verify, ledger)

    verify_slots = [slot for slot, _, _ in VERIFIES]
    assert torch.equal(stepped.conv[:, verify_slots], pool.conv[:, verify_slots])
    assert torch.equal(stepped.recurrent[:, verify_slots], pool.recurrent[:, verify_slots])
    assert ledger.slots == sorted(verify_slots)

    # every request gets a different accepted length; over the shifts each sees every j in 0..its drafts
    accepted = {slot: (shift + r) % (drafts + 1) for r, (slot, _, drafts) in enumerate(VERIFIES)}
    assert len(set(accepted.values())) > 1  # one commit mixes lengths
    # a wholly accepted span (committed from the verify's final state) and a partly accepted one of the same
    # accepted length (replayed) in both orders (shift 1: slot 6 accepts its 1 draft, slot 9 1 of its 3)
    accepted = dict(reversed(accepted.items())) if order == "reversed" else accepted
    commit_verified(layers, stepped, ledger, accepted)
    assert not ledger.slots

    x_rows, out_rows = rows_of(spans, x), [rows_of(spans, out) for out in outs]
    for slot, cached, drafts in VERIFIES:
        alone = copy_of(pool, layers[0])
        for t in range(drafts + 1):  # the plain decodes the verify span stands for
            decoded = run(layers, alone, [Span(slot, cached + t, 1)], x_rows[slot][t:t + 1])
            for layer_out, out in zip(out_rows, decoded):
                torch.testing.assert_close(layer_out[slot][t:t + 1], out, atol=1e-5, rtol=1e-5)
            if t == accepted[slot]:
                assert torch.equal(stepped.conv[:, slot], alone.conv[:, slot])
                torch.testing.assert_close(stepped.recurrent[:, slot], alone.recurrent[:, slot], atol=1e-6, rtol=0)
                assert not torch.equal(stepped.recurrent[:, slot], pool.recurrent[:, slot])

    # the decodes and prefills of the same step moved on as they do alone
    for span in OTHERS:
        alone = copy_of(pool, layers[0])
        run(layers, alone, [span], x_rows[span.state_slot])
        torch.testing.assert_close(stepped.recurrent[:, span.state_slot], alone.recurrent[:, span.state_slot],
                                   atol=1e-5, rtol=1e-5)


def test_only_verify_spans_and_one_token_verify():
    """A step of verify spans alone (no prefill path around them), one of them without drafts."""
    layers = stage_layers()
    pool = filled_pool(layers[0], seed=3)
    spans = [Span(8, 4, 3), Span(1, 9, 1)]
    x = dyadic(torch.randn(4, CONFIG.hidden_size, generator=torch.Generator().manual_seed(6)))
    ledger = VerifyLedger()
    stepped = copy_of(pool, layers[0])
    run(layers, stepped, spans, x, verify=[0, 1], ledger=ledger)
    assert torch.equal(stepped.recurrent, pool.recurrent)
    commit_verified(layers, stepped, ledger, {8: 2, 1: 0})
    alone = copy_of(pool, layers[0])
    for t in range(3):
        run(layers, alone, [Span(8, 4 + t, 1)], x[t:t + 1])
    run(layers, alone, [Span(1, 9, 1)], x[3:4])
    assert torch.equal(stepped.conv, alone.conv)
    torch.testing.assert_close(stepped.recurrent, alone.recurrent, atol=1e-6, rtol=0)


def test_ledger_refusals_and_discard():
    layers = stage_layers()
    pool = filled_pool(layers[0], seed=4)
    x = torch.randn(3, CONFIG.hidden_size, generator=torch.Generator().manual_seed(7))
    ledger = VerifyLedger()
    run(layers, pool, [Span(5, 2, 3)], x, verify=[0], ledger=ledger)
    with pytest.raises(RuntimeError, match="uncommitted verify span"):
        run(layers, pool, [Span(5, 2, 3)], x, verify=[0], ledger=ledger)
    before = pool.recurrent.clone()
    with pytest.raises(ValueError, match="3 accepted drafts, but its verify span has 2"):
        commit_verified(layers, pool, ledger, {5: 3})
    with pytest.raises(KeyError, match="state slot 6 has no verify span"):
        commit_verified(layers, pool, ledger, {5: 1, 6: 0})
    assert 5 in ledger and torch.equal(pool.recurrent, before)  # refused commits change nothing
    ledger.discard([5])
    assert 5 not in ledger and torch.equal(pool.recurrent, before)
    with pytest.raises(ValueError, match="no cached prefix"):
        ForwardBatch.build([Span(5, 0, 3)], [0, 0, 0], verify=[0], verify_ledger=ledger)
    with pytest.raises(ValueError, match="verify ledger"):
        ForwardBatch.build([Span(5, 2, 3)], [0, 0, 0], verify=[0])
