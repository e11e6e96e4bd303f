"""`ResultHandler`: a step's results applied to its requests, and how a request finishes.

Each span's tokens count as computed; prompt logprobs are appended for positions not already known (a
resumed request prefills its prompt again); a sampled token is appended with its logprobs, then the stops
are checked: EOS (unless ignore_eos), stop_token_ids, stop strings, max_new_tokens and the context limit.
A span with an error (non-finite logits) ends its request alone with {"type": "abort", "message"}; a
request with max_new_tokens 0 finishes once its prompt is scored. A finished request's pages enter the
prefix cache (or are freed) and its key is released to the ranks with the next step.

A verify span (speculative decoding) emits a run of tokens, its accepted drafts then the target's own token:
they are appended one by one with the same stop checks, so a run is cut at EOS, a stop string or
max_new_tokens inside it. The request's computed length becomes the accepted length (at most its tokens),
the pages wholly past it go back to the allocator, and the judged span's commit (or discard) is queued for the
ranks (`Speculation`).

`_append_token` is where a token is accepted: a per-request constraint on output tokens (a grammar) would
advance there, next to the stop checks."""

from __future__ import annotations

from collections.abc import Callable

from tandem.runtime.scheduling.cache_manager import CacheManager
from tandem.runtime.scheduling.detokenizer import StopStringWatch
from tandem.runtime.scheduling.queues import Queues
from tandem.runtime.scheduling.request import Request, RequestLimits
from tandem.runtime.step import StepInput, StepOutput


class ResultHandler:
    def __init__(self, queues: Queues, cache: CacheManager, limits: RequestLimits, eos_token_ids,
                 decode_text: Callable[[list[int]], str] | None, constraints=None, speculation=None):
        self.queues, self.cache, self.limits = queues, cache, limits
        self.speculation = speculation  # Speculation or None
        self.constraints = constraints  # ConstraintHooks or None
        self.eos_token_ids, self.decode_text = eos_token_ids, decode_text

    def process(self, step: StepInput, reqs: list[Request], out: StepOutput) -> list[Request]:
        """Apply a step's results; returns the requests it gave a token (some of them now finished).
        A request aborted while the step ran is skipped: its result is dropped."""
        updated = []
        for i, req in enumerate(reqs):
            if step.num_drafts(i):
                if self._process_verify(step, req, out, i):
                    updated.append(req)
                continue
            if req.finished:  # aborted while the step ran
                continue
            start = req.num_cached
            req.num_cached += step.spans[i].num_tokens
            if out.input_logprobs and out.input_logprobs[i] is not None:
                self._record_input_logprobs(req, start, out, i)
            if out.errors and out.errors[i]:
                self.finish(req, {"type": "abort", "message": out.errors[i]})
            elif req.params.max_new_tokens == 0 and req.num_cached >= len(req.prompt_ids):  # scored, nothing to add
                self.finish(req, {"type": "length", "length": 0})
            elif out.tokens[i] is not None:
                if out.next_drafts and out.next_drafts[i] is not None:  # NEXTN: the next verify span's drafts
                    req.next_drafts = list(out.next_drafts[i])
                self._append_token(req, out, i)
            else:
                continue
            updated.append(req)
        return updated

    def _process_verify(self, step: StepInput, req: Request, out: StepOutput, i: int) -> bool:
        """A verify span's run appended; False when its request was aborted while the span ran."""
        k, slot = step.num_drafts(i), step.spans[i].state_slot
        error = out.errors[i] if out.errors else None
        run = out.spec_tokens[i] if out.spec_tokens else None
        if req.finished or error or run is None:
            self.speculation.judged(slot, req, k, None)
            if req.finished:
                return False
            self.finish(req, {"type": "abort", "message": error or "the verify step returned no tokens"})
            return True
        self.speculation.judged(slot, req, k, len(run) - 1)
        if out.next_drafts and out.next_drafts[i] is not None:
            req.next_drafts = list(out.next_drafts[i])
        start = req.num_cached
        logprobs = out.spec_logprobs[i] if out.spec_logprobs else None
        tops = out.spec_top_logprobs[i] if out.spec_top_logprobs else None
        for m, token in enumerate(run):
            # the span computed the KV (and state) of its last token and the accepted drafts; once run[m] is
            # appended, the computed tokens are those and at most all but the newest (set before a finish
            # hands the request's pages to the prefix cache)
            req.num_cached = start + min(len(run), m + 2)
            self._append(req, token, logprobs[m] if logprobs else None, tops[m] if tops else None)
            if req.finished:
                return True
        req.num_planned = req.num_cached
        keep = self.cache.pages_for(req.num_cached + 1)  # the next step writes position num_cached
        if self.cache.trim(req.cache, keep):
            self.speculation.trimmed(req, keep)
        return True

    @staticmethod
    def _record_input_logprobs(req: Request, start: int, out: StepOutput, i: int) -> None:
        """Entry j of the span's prompt logprobs is that of the token at position start + 1 + j; keep the
        prompt positions not already known (a resumed request prefills its prompt again)."""
        tops = out.input_top_logprobs[i] if out.input_top_logprobs else None
        for j, lp in enumerate(out.input_logprobs[i]):
            if start + 1 + j == len(req.input_logprobs) + 1 < len(req.prompt_ids):
                req.input_logprobs.append(lp)
                if tops is not None:
                    req.input_top_logprobs.append(list(tops[j]))

    def _append_token(self, req: Request, out: StepOutput, i: int) -> None:
        self._append(req, out.tokens[i], out.logprobs[i], out.top_logprobs[i] if out.top_logprobs else None)

    def _append(self, req: Request, token: int, logprob: float | None, top) -> None:
        req.output_ids.append(token)
        req.output_logprobs.append(logprob)
        if req.top_logprobs_num:
            req.output_top_logprobs.append(list(top or []))
        constrained = self.constraints is not None and req.params.constraint is not None
        grammar_end = self.constraints.accept(req, token) if constrained else None
        reason = self._finish_reason(req, token) or grammar_end
        if reason:
            self.finish(req, reason)

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
        if len(req.output_ids) >= p.max_new_tokens or req.num_tokens >= self.limits.max_len:
            return {"type": "length", "length": len(req.output_ids)}
        return None

    def finish(self, req: Request, reason: dict) -> None:
        """End `req` (waiting or running) with `reason`; its caches are released."""
        req.finish_reason = reason
        if req in self.queues.waiting:
            self.queues.waiting.remove(req)
        if req in self.queues.running:
            self.queues.running.remove(req)
            self.cache.release(req)
        if req.admissions:
            self.queues.released.append(req.rid)
        if self.constraints is not None:
            self.constraints.release(req)
