"""The step messages between the scheduler and the ranks: `StepInput` (what one forward step computes, a few
ints per request, plus the cache decisions the driver made for it) and `StepOutput` (what the last stage
sampled). Both are msgspec structs, so the rank processes receive and return them through a typed codec
(`tandem.executors.messages`), never pickle.

Every stage applies a step's cache decisions the same way, in this order:
0. speculative decoding: `spec_commits` (each (state slot, j) moves the slot's linear-attention state on by
   the first j + 1 tokens of its last verify span, `tandem.layers.gdn_verify`), `spec_discards` (forget a
   verify span whose request ended), `page_trims` (a request's page table cut to its accepted length);
1. drop the page tables (and sampler state) of `release_keys`;
2. page tables: for each span, `new_pages` are appended to its request's table, or replace it when
   `fresh_table` is set (a request admitted or re-admitted, whose table starts with its prefix-cache hit);
3. linear-attention state slots: `state_restores` (a cached prefix's snapshot -> the request's slot),
   then `state_resets` (a request starting from an empty prefix);
4. the forward pass;
5. `state_snapshots` (a request's slot -> a cache slot, taken right after the chunk that ends at a cached
   prefix end)."""

from __future__ import annotations

import msgspec

from tandem.layers.span import Span
from tandem.runtime.sampling.params import SamplingParams

RequestKey = int | str


def admits_request(span: Span, fresh_table: bool) -> bool:
    """Whether a step's span (re)admits its request on the ranks (its first tokens, or a new page table): the
    step that carries the request's params and starts its sampler state."""
    return span.prefix_len == 0 or fresh_table


class StepInput(msgspec.Struct):
    spans: list[Span]
    input_ids: list[int]  # packed tokens of all spans
    sample: list[bool]  # per span: sample a token after its last token
    # per span, only in the step that (re)admits its request on the ranks (first chunk, or a new page table);
    # None after: the last stage keeps them (decoding 32 params per step cost each rank 0.2 ms)
    params: list[SamplingParams | None]
    keys: list[RequestKey]  # per span: request id (page tables and per-request generators)
    new_pages: list[list[int]] = []  # per span: pages appended to its request's page table before the step
    fresh_table: list[bool] = []  # per span: its page table is new_pages (not appended to)
    state_restores: list[tuple[int, int]] = []  # (cache slot, request slot), before the forward pass
    state_resets: list[int] = []  # request slots starting from the zero state, before the forward pass
    state_snapshots: list[tuple[int, int]] = []  # (request slot, cache slot), after the forward pass
    release_keys: list[RequestKey] = []  # finished requests
    input_logprobs: list[bool] | None = None  # per span: also return logprobs of its tokens' successors
    next_ids: list[int | None] | None = None  # per span: the prompt token after the span, if any
    prompt_lens: list[int] | None = None  # per span: its request's prompt length (positions past it are output)
    top_logprobs_num: list[int] | None = None  # per span: top-N logprobs wanted with its sampled / prompt tokens
    want_logprobs: list[bool] | None = None  # per span: report its sampled token's logprob (None: every span)
    # per span: for a request (re)admitted past position 0 that uses penalties, its tokens before the span
    # (the sampler's token history of a prefix-cache hit); None elsewhere
    histories: list[list[int] | None] | None = None
    # structured output, decided by the driver alone: the spans whose sampled token a grammar constrains, and
    # their packed allowed-token bitmasks, int32 [len(bitmask_rows), ceil(V / 32)] as little-endian bytes (bit j
    # of word w allows token 32 w + j; a verify span has 1 + its drafts rows, one per position, in order); the
    # last stage applies them after penalties and logit_bias
    bitmask_rows: list[int] | None = None
    token_bitmask: bytes | None = None
    # speculative decoding. Per span: its draft tokens (a verify span holds the request's last token and then
    # these, so num_tokens = 1 + len(drafts)); None when no span verifies. The last stage judges them.
    drafts: list[list[int]] | None = None
    spec_commits: list[tuple[int, int]] = []  # (state slot, accepted drafts j) of verify spans judged since
    spec_discards: list[int] = []  # state slots whose verify span is dropped (its request ended meanwhile)
    page_trims: list[tuple[RequestKey, int]] = []  # (request, pages it keeps): pages past its accepted length
    # drawn by the driver for a step with verify spans: unseeded sampled spans draw from generators seeded with
    # (spec_seed, span index), so that every TP rank of the last stage accepts the same drafts
    spec_seed: int | None = None

    def num_drafts(self, i: int) -> int:
        return len(self.drafts[i]) if self.drafts else 0


class StepOutput(msgspec.Struct):
    tokens: list[int | None]  # per span (None where not sampled)
    logprobs: list[float | None]
    input_logprobs: list[list[float] | None] | None = None
    top_logprobs: list[list[tuple[int, float]] | None] | None = None  # per span: [(token id, logprob)]
    errors: list[str | None] | None = None  # per span: why it got no token (numeric failure), else None
    # per span with input_logprobs and top_logprobs_num > 0: per prompt position [(token id, logprob)]
    input_top_logprobs: list[list[list[tuple[int, float]]] | None] | None = None
    # per verify span: the tokens it emits (the j accepted drafts, then the target's own token) and their
    # logprobs (None entries where not wanted); None for the other spans, and None when no span verifies
    spec_tokens: list[list[int] | None] | None = None
    spec_logprobs: list[list[float | None] | None] | None = None
    # per verify span of a request with top_logprobs_num > 0: per emitted token its [(token id, logprob)]
    spec_top_logprobs: list[list[list[tuple[int, float]] | None] | None] | None = None
    # NEXTN: per span that sampled, the next verify span's drafts, made on the last stage
    next_drafts: list[list[int] | None] | None = None
