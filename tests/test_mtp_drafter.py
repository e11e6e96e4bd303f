"""The last stage's NEXTN drafter (`runtime/mtp_drafter.py`) against a float64 reference that computes each
request's drafts from scratch from its accepted history (`support/mtp_reference.py`): several requests in
one batch with scattered pages, chunked prefills (a chunk's last row held over to the next chunk), verify spans
with every accepted count 0..k (rejected rows carry junk hidden states and tokens), plain decodes, for Qwen3.5
dense and MoE and on the last of two pipeline stages. The pool starts as NaN, so a read of a slot that the
drafter has not written (or one a rejected draft left behind that it failed to overwrite) shows."""

from __future__ import annotations

import pytest
import torch

from support.mtp_reference import ReferenceMTP
from support.mtp_schedule import PAGE_SIZE, PLANS, K, build, run_schedule
from tandem.layers.forward_batch import ForwardBatch
from tandem.layers.span import Span
from tandem.models.registry import load_model_config
from tandem.parallel.layout import ParallelLayout
from tandem.runtime.memory.kv_pool import PagedKVPool
from tandem.runtime.mtp_drafter import DraftSpan, MTPDrafter

CASES = {"dense": ("qwen3_5", 1), "moe": ("qwen3_5_moe", 1), "moe-pp2-last-stage": ("qwen3_5_moe", 2)}


@pytest.mark.parametrize("case", CASES)
def test_drafts_match_a_from_scratch_float64_reference(ckpt, case):
    kind, pp = CASES[case]
    model_dir = ckpt(kind, add_mtp=True)
    config = load_model_config(model_dir)
    layout = None if pp == 1 else ParallelLayout.describe((2, config.num_layers - 2), pp_rank=1)
    config, model = build(model_dir, kind, layout)
    reference = ReferenceMTP(model_dir)
    results = run_schedule(model, config)
    assert len(results) == sum(len(v) + 1 for _, v, _ in PLANS.values())
    for request, last, drafts, logits in results:
        expected, expected_logits = reference.drafts(request.tokens, request.hidden, last, K)
        torch.testing.assert_close(logits.double(), expected_logits, atol=1e-4, rtol=1e-4,
                                   msg=f"request {request.key} at P={last}")
        assert drafts == expected, f"request {request.key} at P={last}"
    assert logits.std() > 0.1  # a real signal, not a degenerate head


def test_first_pipeline_stage_has_no_drafter(ckpt):
    model_dir = ckpt("qwen3_5", add_mtp=True)
    config = load_model_config(model_dir)
    _, first = build(model_dir, "qwen3_5", ParallelLayout.describe((2, config.num_layers - 2), pp_rank=0))
    with pytest.raises(ValueError, match="last stage"):
        MTPDrafter(first, K, PAGE_SIZE, 1 << 20)


def test_pages_must_cover_the_chain(ckpt):
    """The chain writes positions P + 1 .. P + K - 1: a table that ends at P is refused, not overrun."""
    model_dir = ckpt("qwen3_5", add_mtp=True)
    config, model = build(model_dir, "qwen3_5")
    pool = PagedKVPool(model.mtp.layer_ids, 4, PAGE_SIZE, config.num_kv_heads, config.head_dim, torch.float32, "cpu")
    drafter = MTPDrafter(model, K, PAGE_SIZE, 1 << 20)
    batch = ForwardBatch.build([Span(0, 0, PAGE_SIZE)], list(range(1, PAGE_SIZE + 1)))
    hidden = torch.randn(PAGE_SIZE, config.hidden_size)
    with pytest.raises(ValueError, match="do not fit"):
        drafter.propose(batch, hidden, ["r"], [[2]], [DraftSpan(None, 9)], kv_pool=pool)
    assert len(drafter.propose(batch, hidden, ["r"], [[2, 0]], [DraftSpan(None, 9)], kv_pool=pool)) == 1
