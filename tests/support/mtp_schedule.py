"""A schedule of steps for the NEXTN drafter's tests (`run_schedule`): several requests in one batch with
scattered pages, chunked prefills, verify spans with a chosen accepted count (rejected rows carry junk hidden
states and wrong tokens) and plain decodes, each request's true tokens and hidden states drawn up front, so that
a reference can compute every request's drafts from its accepted history alone."""

from __future__ import annotations

import random

import torch

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
        assert all(drafts[i] == [] for i in range(len(parts)) if i not in drafting)
        step += 1
    model.compute_logits = original
    return results
