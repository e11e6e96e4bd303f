"""A request as the driver sees it (`Request`), what it holds in the caches while admitted (`CacheHandle`),
and the limits every request is checked against (`RequestLimits`).

`Request` is the user-facing half: tokens, sampling params, logprobs, progress and finish reason. Its cache
holdings are one `CacheHandle` (None while it is not admitted), which only `CacheManager` creates and
changes, and which the step planner reads to tell the ranks about new pages. Ids come from one counter
for the process, so that requests of two engines in one process never share a key."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from tandem.errors import ConfigError
from tandem.runtime.sampling.params import SamplingParams

_ids = itertools.count()


def check_prompt_length(num_tokens: int, max_len: int) -> None:
    """A prompt needs at least one token, and room for at least one new token in the context."""
    if num_tokens == 0:
        raise ConfigError("the prompt is empty: at least one token is needed")
    if num_tokens >= max_len:
        raise ConfigError(f"the prompt has {num_tokens} tokens, but the context length is "
                          f"{max_len} (prompt + at least one new token must fit)")


def check_fits_pool(num_tokens: int, max_total_tokens: int) -> None:
    """A request must fit the KV pool on its own (the smallest stage's), prompt and one new token."""
    if num_tokens >= max_total_tokens:
        raise ConfigError(f"the prompt has {num_tokens} tokens, but the KV cache holds {max_total_tokens} "
                          f"tokens (max_total_tokens; prompt + at least one new token must fit): raise "
                          f"--max-total-tokens or --mem-fraction-static, or use more pipeline stages")


@dataclass(frozen=True)
class RequestLimits:
    """What one request may reach: the context length and the KV pool the ranks agreed on."""

    context_length: int
    max_total_tokens: int

    @cached_property  # read for every request of every step
    def max_len(self) -> int:
        """Tokens (prompt + output) one request may reach."""
        return min(self.context_length, self.max_total_tokens)

    def check_prompt(self, num_tokens: int) -> None:
        """ConfigError naming both numbers when a prompt of `num_tokens` tokens cannot run."""
        check_prompt_length(num_tokens, self.context_length)
        check_fits_pool(num_tokens, self.max_total_tokens)


@dataclass(eq=False)
class CacheHandle:
    """What an admitted request holds (written by `CacheManager` only).

    `pages` is its page table: the first `tree_pages` entries lie on the radix-tree path it has locked
    (`lock_node`), the rest are its own; where it computed a page the tree already held from another request,
    its own copy stays its own (`duplicate_pages`). `unsent_pages` are the pages the ranks' page table does
    not have yet (all of them while `fresh_table`: the ranks' table restarts with them). Hybrid models:
    the state starts from snapshot slot `restore_from` (None: the zero state), `snapshot_points` are the
    token counts after which its state is to be snapshotted into the cache, and while it decodes,
    `track_slot` holds its state after `track_end` tokens (its last page boundary), for the cache to take
    when it ends."""

    state_slot: int
    pages: list[int]
    tree_pages: int
    lock_node: object
    restore_from: int | None = None
    snapshot_points: set[int] = field(default_factory=set)
    duplicate_pages: list[int] = field(default_factory=list)
    unsent_pages: list[int] = field(default_factory=list)
    fresh_table: bool = True
    track_slot: int | None = None  # hybrid: the snapshot slot tracking its state at its last page boundary
    track_end: int = 0  # the tokens that state is after

    def add_pages(self, pages: list[int]) -> None:
        self.pages += pages
        self.unsent_pages += pages

    def take_unsent(self) -> tuple[list[int], bool]:
        """(pages to send, whether they start a fresh table), once: the ranks have them after this step."""
        sent = self.unsent_pages, self.fresh_table
        self.unsent_pages, self.fresh_table = [], False
        return sent


@dataclass(eq=False)  # a request is itself: membership tests in the queues compare identity, not every field
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    rid: object = field(default_factory=lambda: next(_ids))
    input_logprobs_wanted: bool = False
    top_logprobs_num: int = 0  # top-N (token id, logprob) pairs wanted per output (and scored prompt) token
    # whether output_logprobs holds each output token's logprob (else None per token: the sampler then skips
    # the full-vocabulary log_softmax for the request)
    output_logprobs_wanted: bool = True
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float | None] = field(default_factory=list)
    input_logprobs: list[float] = field(default_factory=list)  # [k]: logprob of prompt_ids[k + 1]
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # with top_logprobs_num
    input_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # aligned with input_logprobs
    num_cached: int = 0  # tokens of prompt + output whose KV/state the stages hold
    num_planned: int = 0  # tokens covered by steps planned so far (>= num_cached while a step is in flight)
    cached_tokens: int = 0  # prompt tokens served by the prefix cache when first admitted
    admissions: int = 0
    prefill_end: int = 0  # tokens to prefill since its last admission
    finish_reason: dict | None = None
    on_update: Callable | None = None  # called after each step that changed this request
    cache: CacheHandle | None = None  # while admitted
    stop_watch: object = None  # StopStringWatch of a request with stop strings, made on its first token
    # speculative decoding: NGRAM's lookup table over its accepted tokens; NEXTN's drafts from its last result;
    # verify passes, drafts proposed and drafts accepted (meta_info's spec_* fields)
    speculative: bool = False  # runs with speculative decoding (set when queued)
    ngram_index: object = None
    next_drafts: list[int] = field(default_factory=list)
    spec_verify_ct: int = 0
    spec_proposed_drafts: int = 0
    spec_accepted_drafts: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        """len(all_ids), without building the list."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def scores_prompt(self) -> bool:
        """Whether it still wants prompt logprobs it has not got (then every prompt token is computed)."""
        return self.input_logprobs_wanted and len(self.input_logprobs) < len(self.prompt_ids) - 1

    def ids_between(self, start: int, end: int) -> list[int]:
        """all_ids[start:end], without building the whole list."""
        prompt = len(self.prompt_ids)
        if end <= prompt:
            return self.prompt_ids[start:end]
        if start >= prompt:
            return self.output_ids[start - prompt:end - prompt]
        return self.prompt_ids[start:] + self.output_ids[:end - prompt]

    def forget_progress(self) -> None:
        """Back to the queue: nothing of it is computed or planned any more."""
        self.num_cached = self.num_planned = 0


def shared_pages(a: list[int], b: list[int], page_size: int) -> int:
    """Whole pages at the start of a and b that are equal."""
    n, k = min(len(a), len(b)) // page_size, 0
    while k < n and a[k * page_size:(k + 1) * page_size] == b[k * page_size:(k + 1) * page_size]:
        k += 1
    return k
