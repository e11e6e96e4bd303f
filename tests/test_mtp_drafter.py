"""The last stage's NEXTN drafter (`runtime/mtp_drafter.py`) against a float64 reference that computes each
request's drafts from scratch from its accepted history (`support/mtp_reference.py`): several requests in
one batch with scattered pages, chunked prefills (a chunk's last row held over to the next chunk), verify spans
with every accepted count 0..k (rejected rows carry junk hidden states and tokens), plain decodes, for Qwen3.5
dense and MoE and on the last of two pipeline stages. The pool starts as NaN, so a read of a slot that the
drafter has not written (or one a rejected draft left behind that it failed to overwrite) shows."""

from __future__ import annotations

import random

import pytest
import torch

from support.mtp_reference import ReferenceMTP
from tandem.layers.forward_batch import ForwardBatch
from tandem.layers.span import Span
from tandem.loader import load_weights
from tandem.models.qwen3_5 import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM
from tandem.models.registry import load_model_config
from tandem.parallel.layout import ParallelLayout
from tandem.runtime.memory.kv_pool import PagedKVPool
from tandem.runtime.mtp_drafter import DraftSpan, MTPDrafter

K = 3
PAGE_SIZE = 4
# per request: prompt chunk sizes, then one entry per later step: drafts accepted by a verify span (0..K), or
# None for a plain one-token decode; and the step the request first appears in
PLANS = {"a": ([5, 3], [3, 0, 2, None, 1, 3], 0),
         "b": ([7], [0, 0, 1, 3, 2, 3], 0),
         "c": ([2, 2, 2], [1, 2, 3, 0, None], 1)}


def build(model_dir, kind: str, layout=None):
    config = load_model_config(model_dir)
    cls = Qwen3_5MoeForCausalLM if kind == "qwen3_5_moe" else Qwen3_5ForCausalLM
    model = cls(config, layout or ParallelLayout.single(config.num_layers), mtp=True)
    load_weights(model, model_dir, progress=False)
    return config, model


class Request:
    def __init__(self, key: str, rng: random.Random, gen: torch.Generator, vocab: int, hidden_size: int):
        chunks, verifies, self.start = PLANS[key]
        self.events = [("chunk", n, i == len(chunks) - 1) for i, n in enumerate(chunks)]
        self.events += [("decode", None, None) if a is None else ("verify", a, None) for a in verifies]
        length = sum(chunks) + sum(1 if a is None else a + 1 for a in verifies) + 2 * K + 2
        self.tokens = torch.tensor([rng.randrange(vocab) for _ in range(length)])
        self.hidden = torch.randn(length, hidden_size, generator=gen)  # h_t the target gives at position t
        self.junk = torch.randn(length, hidden_size, generator=gen)  # what rejected rows carry
        self.key, self.vocab, self.length = key, vocab, length
        self.pos = 0  # tokens in the cache: the next span's prefix_len

    def next_span(self):
        """(Span, input ids, hidden rows, DraftSpan, P or None) of this request's next event."""
        kind, n, final = self.events.pop(0)
        x, h, L = self.tokens, self.hidden, self.pos
        if kind == "chunk":
            self.pos += n
            return (Span(0, L, n), x[L:L + n].tolist(), h[L:L + n],
                    DraftSpan(None, int(x[L + n]) if final else None), L + n - 1 if final else None)
        if kind == "decode":
            self.pos += 1
            return Span(0, L, 1), [int(x[L])], h[L:L + 1], DraftSpan(None, int(x[L + 1])), L
        a = n  # a verify span: the last token, a right drafts, then wrong ones
        wrong = [(int(t) + 7) % self.vocab for t in x[L + 1 + a:L + 1 + K]]
        ids = x[L:L + 1 + a].tolist() + wrong
        rows = torch.cat([h[L:L + 1 + a], self.junk[L + 1 + a:L + 1 + K]])
        self.pos = L + a + 1
        return Span(0, L, K + 1), ids, rows, DraftSpan(a, int(x[L + a + 1])), L + a


def run_schedule(model, config, seed: int = 0):
    """Every step: each active request's next event in one batch. Returns [(request, P, drafts, logits)]."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    requests = [Request(key, rng, gen, config.vocab_size, config.hidden_size) for key in PLANS]
    pages_each = [-(-r.length // PAGE_SIZE) for r in requests]
    pages = list(range(sum(pages_each) + 3))
    rng.shuffle(pages)  # scattered, and a few pages nobody owns
    tables = {}
    for r, n in zip(requests, pages_each):
        tables[r.key], pages = pages[:n], pages[n:]
    kv_heads = model.mtp.layers[0].self_attn.num_kv_heads
    pool = PagedKVPool(model.mtp.layer_ids, len(pages) + sum(pages_each), PAGE_SIZE, kv_heads, config.head_dim,
                       torch.float32, "cpu")
    pool.k.fill_(float("nan"))
    pool.v.fill_(float("nan"))
    drafter = MTPDrafter(model, K, PAGE_SIZE, 1 << 20)
    calls, original = [], model.compute_logits
    model.compute_logits = lambda h: calls.append(original(h)) or calls[-1]
    results, step = [], 0
    while any(r.events for r in requests):
        active = [r for r in requests if r.events and r.start <= step]
        parts = [r.next_span() for r in active]
        batch = ForwardBatch.build([p[0] for p in parts], [t for p in parts for t in p[1]])
        calls.clear()
        drafts = drafter.propose(batch, torch.cat([p[2] for p in parts]), [r.key for r in active],
                                 [tables[r.key] for r in active], [p[3] for p in parts], kv_pool=pool)
        drafting = [i for i, p in enumerate(parts) if p[3].next_token is not None]
        for j, i in enumerate(drafting):
            results.append((active[i], parts[i][4], drafts[i], torch.stack([c[j] for c in calls])))
        for i, p in enumerate(parts):
            if i not in drafting:
                assert drafts[i] == []
        step += 1
    model.compute_logits = original
    return results


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
