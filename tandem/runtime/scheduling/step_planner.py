"""`StepPlanner`: what the next step computes, as a `StepInput` (as mini-sglang's decode manager and the
scheduler's batch building).

Every step packs one decode token for each decoding request plus prefill chunks up to the token budget
(`chunked_prefill_size`: long prompts do not stall decoding), over requests not in flight. With
micro-batches, each step takes about 1/num_micro_batches of the running requests. Hybrid models: a prefill
chunk ends where the state is to be snapshotted (`CacheManager.chunk_end`). What each chunk computes is
cached as soon as it is planned (`CacheManager.cache_chunk`). The step carries the cache decisions the ranks apply: new pages
(fresh page tables for (re)admitted requests), state restores and resets, snapshots and the released keys.

Speculative decoding (`Speculation`): a decoding request's step becomes a verify span of its last token plus
up to `speculative_num_steps` drafts, fewer where its max_new_tokens, the context or the step's token budget
end sooner, where no page is free for them (drafts never retract another request) or, hybrid with a prefix
cache, where a fully accepted run would pass a page boundary (states can be tracked only where a verify span
starts, `CacheManager.max_drafts`); the step also carries
the commits, discards and page trims of verify spans judged since the last step."""

from __future__ import annotations

import random

from tandem.layers.span import Span
from tandem.runtime.scheduling.cache_manager import CacheManager
from tandem.runtime.scheduling.preemption import PreemptionManager
from tandem.runtime.scheduling.queues import Queues
from tandem.runtime.scheduling.request import Request, RequestLimits
from tandem.runtime.scheduling.speculation import Speculation
from tandem.runtime.step import StepInput, admits_request


class StepPlanner:
    def __init__(self, queues: Queues, cache: CacheManager, preemption: PreemptionManager, chunk_size: int,
                 constraints=None, speculation: Speculation | None = None, limits: RequestLimits | None = None):
        self.queues, self.cache, self.preemption, self.chunk_size = queues, cache, preemption, chunk_size
        self.constraints = constraints  # ConstraintHooks or None: the token masks of the step's constrained rows
        self.speculation, self.limits = speculation, limits

    def plan(self, busy, num_micro_batches: int) -> tuple[StepInput, list[Request]] | None:
        running = self.queues.running
        cap = -(-len(running) // num_micro_batches)
        chosen: list[tuple[Request, int, list[int]]] = []
        budget = self.chunk_size
        for req in list(running):
            in_flight = req.rid in busy
            if (in_flight and not self._next_chunk_can_follow(req)) or req not in running:
                continue
            if len(chosen) >= cap:
                break
            pending = req.num_tokens - req.num_planned
            drafts: list[int] = []
            chain = self.speculation.chain_tokens if self.speculation is not None else 0
            if req.num_planned and pending == 1 and not in_flight:  # decoding
                if not self.preemption.ensure_page(req, busy, req.num_cached + 1 + chain):
                    continue
                drafts = self._drafts(req, budget, chain)
                n = 1 + len(drafts)
            elif budget > 0:
                n = self.cache.chunk_end(req, req.num_planned + min(pending, budget)) - req.num_planned
                if chain and req.num_planned + n == req.num_tokens \
                        and not self.preemption.ensure_page(req, busy, req.num_tokens + chain):
                    continue
            else:
                continue
            budget -= n
            chosen.append((req, n, drafts))
        chosen = [c for c in chosen if c[0] in running]  # drop those retracted meanwhile
        if not chosen:
            return None
        return self._build(chosen), [req for req, _, _ in chosen]

    def _drafts(self, req: Request, budget: int, chain: int) -> list[int]:
        """The drafts of a decoding request's verify span, with pages for them ([] without speculation)."""
        if self.speculation is None:
            return []
        room = min(req.params.max_new_tokens - len(req.output_ids), self.limits.max_len - req.num_tokens) - 1
        aligned = self.cache.max_drafts(req)
        if aligned is not None:
            room = min(room, aligned)
        drafts = self.speculation.drafts_for(req, min(self.speculation.num_steps, room, budget - 1))
        if drafts and self.constraints is not None and req.params.constraint is not None:
            drafts = self.constraints.admissible_drafts(req, drafts)
        handle, page = req.cache, self.cache.page_size
        short = self.cache.pages_for(req.num_cached + 1 + len(drafts) + chain) - len(handle.pages)
        if short > 0 and not self.cache.extend(handle, short):
            drafts = drafts[:len(handle.pages) * page - req.num_cached - 1 - chain]  # what its pages hold
        return drafts

    @staticmethod
    def _next_chunk_can_follow(req: Request) -> bool:
        """Chunked pipeline prefill: the next prefill chunk of a request may be planned while its previous
        chunks are in flight, since every rank runs steps in order (chunk i's KV and linear-attention state
        are in place when chunk i + 1 arrives) and a chunk that does not end the prompt samples nothing.
        Not for a request that wants its prompt logprobs (they are appended as the chunks come back)."""
        return req.num_planned < req.prefill_end and not req.input_logprobs_wanted

    def _build(self, chosen: list[tuple[Request, int, list[int]]]) -> StepInput:
        spans, ids, new_pages, fresh, histories = [], [], [], [], []
        restores, resets, snapshots = [], [], []
        for req, n, drafts in chosen:
            handle, start, end = req.cache, req.num_planned, req.num_planned + n
            pages, is_fresh = handle.take_unsent()
            if is_fresh:
                if handle.restore_from is None:
                    resets.append(handle.state_slot)
                else:
                    restores.append((handle.restore_from, handle.state_slot))
            spans.append(Span(handle.state_slot, start, n))
            ids.extend(req.ids_between(start, end - len(drafts)) + drafts)
            histories.append(req.all_ids[:start] if is_fresh and start and req.params.uses_penalties else None)
            new_pages.append(pages)
            fresh.append(is_fresh)
            req.num_planned = end
            snapshot = (self.cache.cache_verify(req, start) if drafts else self.cache.cache_chunk(req, start, end))
            if snapshot is not None:
                snapshots.append(snapshot)
        reqs = [req for req, _, _ in chosen]
        drafts = [d for _, _, d in chosen]
        sample = [s.prefix_len + s.num_tokens - len(d) == r.num_tokens and r.params.max_new_tokens > 0
                  for r, s, d in zip(reqs, spans, drafts)]
        masks = self.constraints.masks(reqs, sample, drafts) if self.constraints is not None else None
        pending = self.speculation.take() if self.speculation is not None else None
        return StepInput(
            spans, ids, sample,
            # the ranks keep a request's params from the step that (re)admits it on them
            [r.params if admits_request(s, f) else None for r, s, f in zip(reqs, spans, fresh)],
            [r.rid for r in reqs], new_pages, fresh, restores, resets, snapshots, self.queues.take_released(),
            prompt_lens=[len(r.prompt_ids) for r in reqs],
            histories=histories if any(h is not None for h in histories) else None,
            bitmask_rows=masks[0] if masks else None, token_bitmask=masks[1] if masks else None,
            drafts=drafts if any(drafts) else None, spec_seed=random.getrandbits(63) if any(drafts) else None,
            spec_commits=pending.commits if pending else [], spec_discards=pending.discards if pending else [],
            page_trims=pending.trims if pending else [],
            **_logprob_fields(reqs, spans))


def _logprob_fields(reqs: list[Request], spans: list[Span]) -> dict:
    """The StepInput fields saying which logprobs each span wants (None where no span wants any)."""
    wants = [r.scores_prompt and s.prefix_len < len(r.prompt_ids) for r, s in zip(reqs, spans)]
    next_ids = [r.prompt_ids[s.prefix_len + s.num_tokens] if s.prefix_len + s.num_tokens < len(r.prompt_ids)
                else None for r, s in zip(reqs, spans)]
    tops = [r.top_logprobs_num for r in reqs]
    want_logprobs = [r.output_logprobs_wanted for r in reqs]
    return {"input_logprobs": wants if any(wants) else None, "next_ids": next_ids if any(wants) else None,
            "top_logprobs_num": tops if any(tops) else None,
            "want_logprobs": None if all(want_logprobs) else want_logprobs}
