"""Continuous batching over a paged KV cache: a waiting queue, a running set, admission by tokens, preemption,
and the radix prefix cache's decisions (made here once, applied by every stage; see `CacheManager`).

Admission (FIFO, up to `max_running_requests` running): a request is admitted when the pages for its tokens
not served by the prefix cache, plus a decode reserve, fit in the free and evictable pages after the reserves
of the running requests. The decode reserve of a request is `DECODE_RESERVE_RATIO` of its remaining new
tokens: admission is optimistic, and when a decode step finds no page, the most recently admitted requests
are retracted (pages and state slot freed, back to the front of the queue) and later resume by prefilling
their prompt plus the tokens generated so far. The oldest running request always makes progress.

A request whose prefix another running request is about to cache (they share at least
`IN_BATCH_MIN_SHARED_TOKENS` tokens, more than the cache holds of it) waits for it instead of computing the
same prefix again; for hybrid models that request is also told to snapshot its state where they part.

Hybrid models resume only where a state snapshot was taken; a request snapshots its state at the end of
its prompt (page-aligned) and where its tokens leave the KV other requests cached, so that the next
request with the same prompt, or sharing as much, resumes there.

Every step packs one decode token for each decoding request plus prefill chunks up to the token budget
(chunked prefill, so long prompts do not stall decoding). Requests finish on max_new_tokens, EOS (unless
ignore_eos), stop_token_ids, stop strings, the context limit, or abort. A request with max_new_tokens 0 that
wants its prompt logprobs is prefilled and scored, then finishes without a token.

`requeue_all()` forgets every cache (the ranks were restarted): running requests go back to the front of
the queue and are prefilled again from their prompt plus the tokens they already generated."""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tandem.errors import ConfigError
from tandem.layers.span import Span
from tandem.runtime.sampling.params import SamplingParams
from tandem.runtime.scheduling.cache_manager import CacheManager
from tandem.runtime.scheduling.constraint_hooks import ConstraintHooks
from tandem.runtime.scheduling.detokenizer import StopStringWatch
from tandem.runtime.step import StepInput, StepOutput, admits_request

logger = logging.getLogger("tandem")

DECODE_RESERVE_RATIO = 0.5
IN_BATCH_MIN_SHARED_TOKENS = 32

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
    finish_reason: dict | None = None
    on_update: Callable | None = None  # called after each step that changed this request
    # cache holdings (see CacheManager)
    state_slot: int | None = None
    pages: list[int] = field(default_factory=list)
    tree_pages: int = 0
    duplicate_pages: list[int] = field(default_factory=list)
    lock_node: object = None
    snapshot_points: set[int] = field(default_factory=set)  # hybrid: state snapshots to take (token counts)
    restore_from: int | None = None  # hybrid: the snapshot slot its state starts from (None: zero state)
    prefill_end: int = 0  # tokens to prefill since its last admission
    unsent_pages: list[int] = field(default_factory=list)  # pages the ranks' page tables do not have yet
    fresh_table: bool = False  # the ranks' page table restarts with unsent_pages
    stop_watch: object = None  # StopStringWatch of a request with stop strings, made on its first token

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

    def ids_between(self, start: int, end: int) -> list[int]:
        """all_ids[start:end], without building the whole list."""
        prompt = len(self.prompt_ids)
        if end <= prompt:
            return self.prompt_ids[start:end]
        if start >= prompt:
            return self.output_ids[start - prompt:end - prompt]
        return self.prompt_ids[start:] + self.output_ids[:end - prompt]


def shared_pages(a: list[int], b: list[int], page_size: int) -> int:
    """Whole pages at the start of a and b that are equal."""
    n, k = min(len(a), len(b)) // page_size, 0
    while k < n and a[k * page_size:(k + 1) * page_size] == b[k * page_size:(k + 1) * page_size]:
        k += 1
    return k


class Scheduler:
    def __init__(self, cache: CacheManager, context_length: int, chunk_size: int, eos_token_ids=(),
                 decode_text: Callable[[list[int]], str] | None = None, constraints: ConstraintHooks | None = None):
        self.chunk_size = chunk_size
        self.constraints = constraints  # structured output (grammar readiness, masks, matchers); None: refused
        self.use_cache(cache, context_length)
        self.eos_token_ids = set(eos_token_ids)
        self.decode_text = decode_text
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._released: list = []
        self.num_preemptions = 0
        self.prefix_queries = self.prefix_query_tokens = self.prefix_hit_tokens = 0

    def use_cache(self, cache: CacheManager, context_length: int) -> None:
        """Plan with `cache` (a fresh one after the ranks were restarted, when nothing runs) and its limits."""
        self.cache = cache
        self.page_size = cache.page_size
        self.context_length = context_length
        self.max_len = min(context_length, self.cache.max_total_tokens)  # tokens one request may reach

    # ---- requests in and out ------------------------------------------------------------------------------
    def validate(self, req: Request) -> None:
        n = len(req.prompt_ids)
        check_prompt_length(n, self.context_length)
        check_fits_pool(n, self.cache.max_total_tokens)

    def add(self, req: Request) -> None:
        self.validate(req)
        if req.params.constraint is not None and self.constraints is None:
            raise ConfigError(f"{req.params.constraint[0]}: structured output is not available in this scheduler")
        if req.params.max_new_tokens == 0 and not req.input_logprobs_wanted:
            req.finish_reason = {"type": "length", "length": 0}
            return
        self.waiting.append(req)

    def abort(self, rid, message: str | None = None) -> bool:
        """Finish request `rid` with {"type": "abort"} (plus `message`, the reason, when the engine ends it
        rather than its client). False if there is no such unfinished request."""
        for req in list(self.waiting) + self.running:
            if req.rid == rid:
                self._finish(req, {"type": "abort", "message": message} if message else {"type": "abort"})
                return True
        return False

    def requeue_all(self) -> list[Request]:
        """Every cache is gone (the ranks were restarted): forget every page, slot and prefix, and put the
        running requests back at the front of the queue, in the order they were admitted, to be prefilled
        again from position 0 (prompt + tokens already generated; the sampler rebuilds its history from what
        is fed through the model). Returns them."""
        requeued = list(self.running)
        for req in requeued:
            req.pages, req.tree_pages, req.duplicate_pages, req.lock_node, req.state_slot = [], 0, [], None, None
            req.num_cached = req.num_planned = 0
            req.snapshot_points = set()
            req.unsent_pages, req.fresh_table = [], False
            if self.constraints is not None:
                self.constraints.reset(req)
        self.cache.reset()
        self.waiting.extendleft(reversed(requeued))
        self.running.clear()
        self._released.clear()  # the fresh ranks hold no state for them
        return requeued

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- admission ----------------------------------------------------------------------------------------
    def _reserve_tokens(self, req: Request) -> int:
        remaining = min(req.params.max_new_tokens - len(req.output_ids), self.max_len - req.num_tokens)
        return math.ceil(DECODE_RESERVE_RATIO * max(remaining, 0))

    def _future_pages(self, req: Request) -> int:
        """Pages a running request is expected to take beyond those it holds (its decode reserve)."""
        target = min(req.num_tokens + self._reserve_tokens(req), self.max_len)
        return max(0, self.cache.pages_for(target) - len(req.pages))

    def _admit(self) -> None:
        i = 0
        while i < len(self.waiting) and len(self.running) < self.cache.max_running_requests:
            req = self.waiting[i]
            if not self._grammar_ready(req):  # waits for its grammar without holding up the others
                i += req in self.waiting
                continue
            admitted = self._try_admit(req)
            if admitted is None:  # waits for a running request to cache its prefix
                i += 1
                continue
            if not admitted:
                break  # no room: later requests do not overtake it
            del self.waiting[i]
            self.running.append(req)

    def _grammar_ready(self, req: Request) -> bool:
        """Whether req's grammar (if any) is compiled; a grammar that does not compile ends req (abort)."""
        if self.constraints is None or req.params.constraint is None:
            return True
        try:
            return self.constraints.ready(req)
        except ConfigError as exc:
            self._finish(req, {"type": "abort", "message": str(exc)})
            if req.on_update is not None:  # no step will report it: tell its owner now
                try:
                    req.on_update(req)
                except Exception:
                    logger.exception("on_update of request %s failed", req.rid)
            return False

    def _try_admit(self, req: Request) -> bool | None:
        ids = req.all_ids
        wants_input_logprobs = req.input_logprobs_wanted and len(req.input_logprobs) < len(req.prompt_ids) - 1
        # prompt logprobs need every prompt token computed; at least one token is always computed
        match = None if wants_input_logprobs else self.cache.match(ids[:-1])
        matched = match.matched_len if match is not None else 0
        if self.cache.radix is not None and not wants_input_logprobs and self._shares_pending_prefix(req, matched):
            return None
        need = self.cache.pages_for(len(ids)) - matched // self.page_size
        if self.running:  # alone, a request only needs room for its tokens (it may then use the whole pool)
            reserve = self.cache.pages_for(min(len(ids) + self._reserve_tokens(req), self.max_len))
            reserve -= self.cache.pages_for(len(ids))
            committed = sum(self._future_pages(r) for r in self.running)
            available = self.cache.available_pages - (self._evictable_in(match) if match else 0)
            if available - committed < need + reserve:
                return False
        restore = self.cache.snapshot_slot_of(match)
        if not self.cache.admit(req, match, len(ids)):
            return False
        if req.admissions == 0:
            req.cached_tokens = matched
            if self.cache.radix is not None:
                self.prefix_queries += 1
                self.prefix_query_tokens += len(req.prompt_ids)
                self.prefix_hit_tokens += matched
        req.admissions += 1
        req.num_cached = req.num_planned = matched
        req.unsent_pages, req.fresh_table = list(req.pages), True
        req.restore_from, req.prefill_end = restore, len(ids)
        req.snapshot_points = set()
        if self.cache.hybrid and self.cache.radix is not None:
            end = (len(ids) - 1) // self.page_size * self.page_size  # where a same-prompt request can resume
            # where its tokens leave the cached KV of earlier requests: later requests sharing that much resume there
            branch = self.cache.radix.cached_len(ids[:-1]) if match is not None else 0
            req.snapshot_points.update(p for p in (end, branch) if p > matched)
        return True

    def _evictable_in(self, match) -> int:
        """Evictable pages that admitting with `match` would lock (they stop being available)."""
        node, count = match.node, 0
        while node is not None and node is not self.cache.radix.root:
            if node.lock_ref == 0:
                count += len(node.pages)
            node = node.parent
        return count

    def _shares_pending_prefix(self, req: Request, matched: int) -> bool:
        """Whether a running request is about to cache more of req's prefix than the cache holds now (and, for
        a hybrid model, has been asked to snapshot its state where their tokens part)."""
        ps = self.page_size
        ids = req.all_ids[:-1]
        for other in self.running:
            if other.num_planned >= other.prefill_end:
                continue  # its prefill is planned: what it caches is in the tree already
            shared = shared_pages(ids, other.all_ids[:other.prefill_end], ps) * ps
            if shared < IN_BATCH_MIN_SHARED_TOKENS or shared <= matched:
                continue
            if not self.cache.hybrid:
                if other.tree_pages * ps < shared:
                    return True
            elif other.num_planned < shared:
                other.snapshot_points.add(shared)
                return True
        return False

    # ---- preemption ---------------------------------------------------------------------------------------
    def _ensure_page(self, req: Request, busy) -> bool:
        """A page for req's next token, retracting the newest running requests if none is left. False when req
        itself was retracted or only busy requests hold pages."""
        while len(req.pages) * self.page_size <= req.num_cached:
            page = self.cache.alloc_pages(1)
            if page is not None:
                req.pages += page
                req.unsent_pages += page
                continue
            victim = next((r for r in reversed(self.running) if r.rid not in busy), None)
            if victim is None:
                return False
            self._retract(victim)
            if victim is req:
                return False
        return True

    def _retract(self, req: Request) -> None:
        self.running.remove(req)
        self._cache_computed(req)
        self.cache.release(req)
        req.num_cached = req.num_planned = 0
        req.snapshot_points = set()
        if self.constraints is not None:
            self.constraints.reset(req)  # rebuilt from its output tokens when it runs again
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _cache_computed(self, req: Request) -> None:
        """Leave the request's computed tokens in the prefix cache (not for hybrids: no state snapshot there)."""
        if self.cache.radix is not None and not self.cache.hybrid:
            self.cache.insert(req, req.num_cached // self.page_size * self.page_size)

    # ---- steps --------------------------------------------------------------------------------------------
    def next_step(self, busy: set = frozenset(), num_micro_batches: int = 1) -> tuple[StepInput, list[Request]] | None:
        """Plan one step over requests not in `busy` (their previous step is still in flight). With
        micro-batches, each step takes about 1/num_micro_batches of the running requests."""
        for _ in range(2):  # a retraction can leave nothing to run; admitting again then finds work
            self._admit()
            planned = self._plan(busy, num_micro_batches)
            if planned is not None or busy or not self.has_work:
                return planned
        return None

    def _plan(self, busy, num_micro_batches: int) -> tuple[StepInput, list[Request]] | None:
        cap = -(-len(self.running) // num_micro_batches)
        chosen: list[tuple[Request, int]] = []
        budget = self.chunk_size
        for req in list(self.running):
            in_flight = req.rid in busy
            if (in_flight and not self._next_chunk_can_follow(req)) or req not in self.running:
                continue
            if len(chosen) >= cap:
                break
            pending = req.num_tokens - req.num_planned
            if req.num_planned and pending == 1 and not in_flight:  # decoding
                if not self._ensure_page(req, busy):
                    continue
                n = 1
            elif budget > 0:
                n = self._chunk_end(req, req.num_planned + min(pending, budget)) - req.num_planned
            else:
                continue
            budget -= n
            chosen.append((req, n))
        chosen = [(req, n) for req, n in chosen if req in self.running]  # drop those retracted meanwhile
        if not chosen:
            return None
        return self._build(chosen), [req for req, _ in chosen]

    @staticmethod
    def _next_chunk_can_follow(req: Request) -> bool:
        """Chunked pipeline prefill: the next prefill chunk of a request may be planned while its previous
        chunks are in flight, since every rank runs steps in order (chunk i's KV and linear-attention state
        are in place when chunk i + 1 arrives) and a chunk that does not end the prompt samples nothing.
        Not for a request that wants its prompt logprobs (they are appended as the chunks come back)."""
        return req.num_planned < req.prefill_end and not req.input_logprobs_wanted

    def _chunk_end(self, req: Request, end: int) -> int:
        """A prefill chunk ends at the first snapshot point it would cross."""
        points = [p for p in req.snapshot_points if req.num_planned < p < end]
        return min(points) if points else end

    def _build(self, chosen: list[tuple[Request, int]]) -> StepInput:
        spans, ids, sample, new_pages, fresh, histories = [], [], [], [], [], []
        restores, resets, snapshots = [], [], []
        for req, n in chosen:
            start, end = req.num_planned, req.num_planned + n
            if req.fresh_table:
                restore = req.restore_from
                if restore is None:
                    resets.append(req.state_slot)
                else:
                    restores.append((restore, req.state_slot))
            spans.append(Span(req.state_slot, start, n))
            ids.extend(req.ids_between(start, end))
            sample.append(end == req.num_tokens and req.params.max_new_tokens > 0)
            histories.append(req.all_ids[:start] if req.fresh_table and start and req.params.uses_penalties else None)
            new_pages.append(req.unsent_pages)
            fresh.append(req.fresh_table)
            req.unsent_pages, req.fresh_table = [], False
            req.num_planned = end
            if self.cache.radix is not None:
                if self.cache.hybrid:
                    if end in req.snapshot_points:
                        req.snapshot_points.discard(end)
                        slot = self.cache.insert(req, end, snapshot=True)
                        if slot is not None:
                            snapshots.append((req.state_slot, slot))
                elif start < req.prefill_end - 1:  # a prefill chunk: its whole pages are cached from now on
                    self.cache.insert(req, end // self.page_size * self.page_size)
        released, self._released = self._released, []
        reqs = [req for req, _ in chosen]
        wants = [r.input_logprobs_wanted and s.prefix_len < len(r.prompt_ids)
                 and len(r.input_logprobs) < len(r.prompt_ids) - 1 for r, s in zip(reqs, spans)]
        next_ids = [r.prompt_ids[s.prefix_len + s.num_tokens] if s.prefix_len + s.num_tokens < len(r.prompt_ids)
                    else None for r, s in zip(reqs, spans)]
        tops = [r.top_logprobs_num for r in reqs]
        want_logprobs = [r.output_logprobs_wanted for r in reqs]
        # the ranks keep a request's params from the step that (re)admits it on them
        params = [r.params if admits_request(s, f) else None for r, s, f in zip(reqs, spans, fresh)]
        masks = self.constraints.masks(reqs, sample) if self.constraints is not None else None
        return StepInput(spans, ids, sample, params, [r.rid for r in reqs], new_pages, fresh,
                         restores, resets, snapshots, released, input_logprobs=wants if any(wants) else None,
                         next_ids=next_ids if any(wants) else None, prompt_lens=[len(r.prompt_ids) for r in reqs],
                         top_logprobs_num=tops if any(tops) else None,
                         want_logprobs=None if all(want_logprobs) else want_logprobs,
                         histories=histories if any(h is not None for h in histories) else None,
                         bitmask_rows=masks[0] if masks else None, token_bitmask=masks[1] if masks else None)

    def process(self, step: StepInput, reqs: list[Request], out: StepOutput) -> list[Request]:
        """Apply a step's results; returns the requests it gave a token (some of them now finished).
        A request aborted while the step ran is skipped: its result is dropped."""
        updated = []
        for i, req in enumerate(reqs):
            if req.finished:  # aborted while the step ran
                continue
            start = req.num_cached
            req.num_cached += step.spans[i].num_tokens
            if out.input_logprobs and out.input_logprobs[i] is not None:
                # entry j is the logprob of the token at position start + 1 + j; keep prompt positions not
                # already known (a resumed request prefills its prompt again)
                tops = out.input_top_logprobs[i] if out.input_top_logprobs else None
                for j, lp in enumerate(out.input_logprobs[i]):
                    if start + 1 + j == len(req.input_logprobs) + 1 < len(req.prompt_ids):
                        req.input_logprobs.append(lp)
                        if tops is not None:
                            req.input_top_logprobs.append(list(tops[j]))
            if out.errors and out.errors[i]:
                self._finish(req, {"type": "abort", "message": out.errors[i]})
                updated.append(req)
                continue
            if req.params.max_new_tokens == 0 and req.num_cached >= len(req.prompt_ids):  # scored, nothing to add
                self._finish(req, {"type": "length", "length": 0})
                updated.append(req)
                continue
            if out.tokens[i] is None:
                continue
            token = out.tokens[i]
            req.output_ids.append(token)
            req.output_logprobs.append(out.logprobs[i])
            if req.top_logprobs_num:
                req.output_top_logprobs.append(list(out.top_logprobs[i] or []) if out.top_logprobs else [])
            grammar_end = self.constraints.accept(req, token) if self.constraints is not None else None
            reason = self._finish_reason(req, token) or grammar_end
            if reason:
                self._finish(req, reason)
            updated.append(req)
        return updated

    def _finish_reason(self, req: Request, token: int) -> dict | None:
        p = req.params
        if not p.ignore_eos and token in self.eos_token_ids:
            return {"type": "stop", "matched": token}
        if token in p.stop_token_ids:
            return {"type": "stop", "matched": token}
        if p.stop and self.decode_text is not None:
            if req.stop_watch is None:
                req.stop_watch = StopStringWatch(self.decode_text, p.stop)
            matched = req.stop_watch.feed(req.output_ids)
            if matched is not None:
                return {"type": "stop", "matched": matched}
        if len(req.output_ids) >= p.max_new_tokens:
            return {"type": "length", "length": len(req.output_ids)}
        if req.num_tokens >= self.max_len:
            return {"type": "length", "length": len(req.output_ids)}
        return None

    def _finish(self, req: Request, reason: dict) -> None:
        req.finish_reason = reason
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
            self._cache_computed(req)
            self.cache.release(req)
        if req.admissions:
            self._released.append(req.rid)
        if self.constraints is not None:
            self.constraints.release(req)

    # ---- statistics ---------------------------------------------------------------------------------------
    def stats(self) -> dict:
        cache = self.cache
        radix = cache.radix
        return {
            "max_total_tokens": cache.max_total_tokens, "page_size": cache.page_size,
            "max_running_requests": cache.max_running_requests, "num_state_slots": cache.num_state_slots,
            "used_pages": cache.used_pages, "num_pages": cache.num_pages,
            "cached_pages": radix.total_cached_pages if radix else 0,
            "running": len(self.running), "waiting": len(self.waiting),
            "preemptions": self.num_preemptions, "radix_cache": radix is not None,
            "prefix_cache_queries": self.prefix_queries, "prefix_cache_query_tokens": self.prefix_query_tokens,
            "prefix_cache_hit_tokens": self.prefix_hit_tokens,
        }
