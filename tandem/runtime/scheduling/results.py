"""`ResultHandler`: a step's results applied to its requests, and how a request finishes.

Each span's tokens count as computed; prompt logprobs are appended for positions not already known (a
resumed request prefills its prompt again); a sampled token is appended with its logprobs, then the stops
are checked: EOS (unless ignore_eos), stop_token_ids, stop strings, max_new_tokens and the context limit.
A span with an error (non-finite logits) ends its request alone with {"type": "abort", "message"}; a
request with max_new_tokens 0 finishes once its prompt is scored. A finished request's pages enter the
prefix cache (or are freed) and its key is released to the ranks with the next step.

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
                 decode_text: Callable[[list[int]], str] | None, constraints=None):
        self.queues, self.cache, self.limits = queues, cache, limits
        self.constraints = constraints  # ConstraintHooks or None
        self.eos_token_ids, self.decode_text = eos_token_ids, decode_text

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
                self._record_input_logprobs(req, start, out, i)
            if out.errors and out.errors[i]:
                self.finish(req, {"type": "abort", "message": out.errors[i]})
            elif req.params.max_new_tokens == 0 and req.num_cached >= len(req.prompt_ids):  # scored, nothing to add
                self.finish(req, {"type": "length", "length": 0})
            elif out.tokens[i] is not None:
                self._append_token(req, out, i)
            else:
                continue
            updated.append(req)
        return updated

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
        token = out.tokens[i]
        req.output_ids.append(token)
        req.output_logprobs.append(out.logprobs[i])
        if req.top_logprobs_num:
            req.output_top_logprobs.append(list(out.top_logprobs[i] or []) if out.top_logprobs else [])
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
