"""`MTPDrafter`: the last stage's NEXTN drafts. After a step, the MTP head (`models/mtp.py`) runs over the
positions the step made final (so that its KV holds exactly those), then chains `num_steps` greedy drafts.

What the runner passes to `propose(batch, hidden, keys, page_tables, spans)`, in the step's span order:
- `batch`: the step's `ForwardBatch` (its `input_ids`, `offsets`, `spans`; a verify span's input ids are the
  request's last token then its k drafts);
- `hidden`: the last stage's final hidden states [T, H], after the final norm (what `CausalLM.forward`
  returns on the last stage and `compute_logits` takes; `MTPHead.forward` expects exactly these);
- `keys`: the requests' keys; `page_tables`: each request's pages (the runner's `page_tables[key]`);
- `spans`: one `DraftSpan` per span: `accepted`, the drafts the acceptance rule kept (a verify span, 0..k) or
  None (every row of the span is final: a prefill chunk, a plain decode); `next_token`, the token sampled after
  the span's last final row (the bonus or correction token), or None for a prefill chunk that is not the
  prompt's last.
It returns one list per span: the k drafts that follow `next_token` ([] where `next_token` is None).

What it computes, for a span whose final rows are positions p .. P (rows 0 .. accepted of a verify span):
1. The head over (h_t, x_{t+1}) for t = p .. P, at position t, where x_{t+1} is the next input id of the span
   and, for t = P, `next_token` (one batched MTP forward over all spans). Its KV then holds positions p .. P.
   A prefill chunk that is not the prompt's last has no x_{t+1} for its last row: that row (h_P, P) is kept and
   run first with the request's next span, whose first input id is x_{P+1} (`release` forgets it).
2. Chained drafts, as vLLM's and SGLang's MTP proposers chain them: d_1 = argmax of the head's logits at P;
   step i (1 .. k-1) runs the head at position P + i on (its own previous output, the normed hidden state it
   returned, and d_i), and d_{i+1} is its argmax (`layers[i % mtp_num_hidden_layers]`, as both do). The
   argmax is over the vocabulary the LM head all-gathers across TP ranks, so every TP rank drafts the same
   tokens (the head's inputs are equal on all of them: replicated `fc`, all-reduced layer outputs).

KV and pages. The MTP layers' keys and values live in the stage's KV pool under `MTPHead.layer_ids`, in the
request's own pages (same page table as the target: the positions are the target's), so the pool the runner
builds must include those layer ids. Step 2 writes the KV of positions P + 1 .. P + k - 1, so a request's page
table must cover position P + k - 1 when `propose` runs: a verify span at prefix_len L with k drafts needs
pages for L + 2k tokens (P <= L + k), a final prefill chunk ending at P for P + k tokens. A table that falls
short is a ValueError (from `PagedAttentionMetadata.build`), never a write into a page the request does not own.
Pages past the accepted length may then be freed by the driver: what the chain wrote there is never read.

Why stale MTP keys are never read: a query at position q reads keys 0 .. q only. Step 1 writes every position
up to P before its queries read them (in order: prefill chunks, then each verify step's final positions, which
start at the previous P + 1). The chain's entries at P + 1 .. P + k - 1 are read only by the chain's own later
queries in the same `propose`, and the next step 1 overwrites positions P + 1 .. P' before anything reads them,
whatever was accepted (a verify span's first final row is P + 1, and P' >= P + 1). Rejected drafts' target KV
is the driver's rollback, as for any span.

With the radix cache, a request whose prefix of c tokens came from the cache has the MTP entry at c - 1 that
the caching request wrote, from its own token c, which may differ from this request's: its drafts can then
differ from an uncached run (acceptance only; the target still decides every token)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.layers.forward_batch import ForwardBatch
from tandem.layers.paged_metadata import PagedAttentionMetadata
from tandem.layers.span import Span
from tandem.runtime.sampling.argmax import row_argmax


@dataclass(frozen=True)
class DraftSpan:
    accepted: int | None  # verify span: drafts kept (0..k); None: every row of the span is final
    next_token: int | None  # sampled after the last final row; None: a prompt chunk that is not the last


@dataclass(frozen=True)
class _Rows:
    """One request's rows of the head's first pass: positions first .. first + len(tokens) - 1."""
    span: int
    first: int
    hidden: torch.Tensor  # [n, H]
    tokens: list[int]


class MTPDrafter:
    def __init__(self, model, num_steps: int, page_size: int, chunk_keys: int, device="cpu"):
        """`model`: the last stage's `WithMTP` model built with mtp=True; `chunk_keys`: the decode workspace
        budget the runner uses for the target (`decode_chunk_keys`)."""
        if model.mtp is None:
            raise ValueError("the MTP drafter runs on the last stage of a model built with mtp=True")
        if num_steps < 1:
            raise ValueError(f"speculative_num_steps must be >= 1, got {num_steps}")
        self.model, self.num_steps = model, num_steps
        self.page_size, self.chunk_keys, self.device = page_size, chunk_keys, device
        self._held: dict = {}  # key -> (position, hidden [1, H]) of a prompt chunk's last row

    def release(self, key) -> None:
        """Forget a request (finished, aborted or retracted)."""
        self._held.pop(key, None)

    @torch.inference_mode()
    def propose(self, batch: ForwardBatch, hidden: torch.Tensor, keys: list, page_tables: list[list[int]],
                spans: list[DraftSpan], kv_pool=None) -> list[list[int]]:
        """See the module docstring. `kv_pool`: the stage's pool (default: `batch.kv_pool`)."""
        if not len(spans) == len(batch.spans) == len(keys) == len(page_tables):
            raise ValueError(f"{len(spans)} draft spans, {len(batch.spans)} batch spans, {len(keys)} keys, "
                             f"{len(page_tables)} page tables: one of each per span")
        pool = kv_pool if kv_pool is not None else batch.kv_pool
        rows = [r for r in (self._final_rows(batch, hidden, keys, i, s) for i, s in enumerate(spans)) if r]
        drafts: list[list[int]] = [[] for _ in spans]
        if not rows:
            return drafts
        out = self._run(pool, [page_tables[r.span] for r in rows], [r.first for r in rows],
                        [len(r.tokens) for r in rows], torch.cat([r.hidden for r in rows]),
                        [t for r in rows for t in r.tokens], step=0)
        ends = (torch.tensor([len(r.tokens) for r in rows]).cumsum(0) - 1).tolist()
        chain = [(r, end) for r, end in zip(rows, ends) if spans[r.span].next_token is not None]
        if chain:
            last = out[torch.tensor([end for _, end in chain], device=out.device)]
            self._chain(pool, [r for r, _ in chain], page_tables, last, drafts)
        return drafts

    def _final_rows(self, batch: ForwardBatch, hidden: torch.Tensor, keys: list, i: int,
                    span: DraftSpan) -> _Rows | None:
        """Span i's rows for the head's first pass (a held row in front), holding back a prompt chunk's last
        row while its next token is unknown."""
        s, offset = batch.spans[i], batch.offsets[i]
        count = s.num_tokens
        if span.accepted is not None:
            if not 0 <= span.accepted < s.num_tokens:
                raise ValueError(f"span {i}: {span.accepted} drafts accepted of a verify span of "
                                 f"{s.num_tokens} tokens")
            if span.next_token is None:
                raise ValueError(f"span {i}: a verify span always has a next token")
            count = span.accepted + 1
        ids = batch.input_ids[offset:offset + count].tolist()
        h, first = hidden[offset:offset + count], s.prefix_len
        held = self._held.pop(keys[i], None)
        if held is not None and held[0] == first - 1:  # the previous chunk's last row: its x_{t+1} is ids[0]
            (first, held_row), nexts = held, ids
            h = torch.cat([held_row, h])
        else:
            nexts = ids[1:]  # row t's next token is the span's input id at t + 1
        if span.next_token is None:
            self._held[keys[i]] = (first + len(h) - 1, h[-1:].clone())
            h = h[:-1]
        else:
            nexts = nexts + [span.next_token]
        return _Rows(i, first, h, nexts) if len(h) else None

    def _chain(self, pool, chain: list[_Rows], page_tables: list[list[int]], last: torch.Tensor,
               drafts: list[list[int]]) -> None:
        """Steps 1 .. k-1 of the chain, one row per drafting request at position P + step."""
        positions = [r.first + len(r.tokens) - 1 for r in chain]  # P of each
        tables = [page_tables[r.span] for r in chain]
        token = self._argmax(last)
        for r, t in zip(chain, token):
            drafts[r.span].append(t)
        for step in range(1, self.num_steps):
            last = self._run(pool, tables, [p + step for p in positions], [1] * len(chain), last, token, step)
            token = self._argmax(last)
            for r, t in zip(chain, token):
                drafts[r.span].append(t)

    def _run(self, pool, tables, firsts: list[int], counts: list[int], hidden: torch.Tensor, tokens: list[int],
             step: int) -> torch.Tensor:
        """The head over requests' rows: request i's `counts[i]` rows at positions firsts[i] .. (their KV written
        to the MTP layer's slots of its pages). Returns the head's normed hidden states [rows, H]."""
        spans = [Span(0, first, n) for first, n in zip(firsts, counts)]
        mtp_batch = ForwardBatch.build(spans, tokens, self.device)
        mtp_batch.kv_pool = pool
        mtp_batch.attn = PagedAttentionMetadata.build(tables, firsts, counts, self.page_size, self.chunk_keys,
                                                      self.device)
        return self.model.mtp_forward(mtp_batch, hidden, step)

    def _argmax(self, hidden: torch.Tensor) -> list[int]:
        return row_argmax(self.model.compute_logits(hidden)).tolist()
