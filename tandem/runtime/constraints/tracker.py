"""`ConstraintTracker`: the driver's grammar matchers, one per request (so one per completion with n > 1), the
scheduler's `ConstraintHooks`.

A matcher is a function of the request's output tokens: it is built (or rebuilt, after a preemption or a
rank restart, which only `reset` it) by replaying `req.output_ids`, and advanced by `accept` with each new
token. With `constraint_after_token_id`, the grammar applies only to the tokens after the first occurrence of
that token in the output (the answer after a reasoning block): until then the row gets no mask.

Masks are filled only for the constrained rows of a step (xgrammar fills a row's bitmask in C++, no Python
loop over the vocabulary) and packed as bytes for `StepInput.token_bitmask`.

Speculative decoding: a request's drafts are cut to the longest prefix the grammar allows
(`admissible_drafts`: each draft accepted in turn, none that ends the grammar, none from the reasoning-end
token on while the grammar waits for it), and its verify span gets one mask per position, the matcher's
state after the drafts before it; the matcher is rolled back after each walk, so it only ever holds the
request's accepted output."""

from __future__ import annotations

from dataclasses import dataclass

from tandem.errors import ConfigError
from tandem.runtime.constraints.grammars import GrammarCache

NO_TOKENIZER = "structured output (json_schema, regex, ebnf) needs the model's tokenizer, and this model has none"


@dataclass
class _State:
    matcher: object  # xgrammar.GrammarMatcher
    consumed: int = 0  # output tokens accounted for
    active_from: int | None = 0  # output index from which the grammar applies (None: not yet)
    failed: bool = False  # a token the grammar refused was accepted (cannot happen with the mask applied)


class ConstraintTracker:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        self._args = (tokenizer, vocab_size, list(stop_token_ids))
        self._grammars: GrammarCache | None = None
        self._states: dict[object, _State] = {}

    @property
    def grammars(self) -> GrammarCache:
        """The grammar cache, made on first use (importing xgrammar costs about a second)."""
        if self._grammars is None:
            if self._args[0] is None:
                raise ConfigError(NO_TOKENIZER)
            self._grammars = GrammarCache(*self._args)
        return self._grammars

    def compile(self, params) -> None:
        """Wait for the grammar of `params` (if any) to compile; ConfigError with the compiler's message if it
        does not. For callers that want the error before queuing (the server, `Engine.generate`)."""
        if params.constraint is not None:
            self.grammars.get(params.constraint)

    # ---- ConstraintHooks ---------------------------------------------------------------------------------
    def ready(self, req) -> bool:
        key = req.params.constraint
        if key is None:
            return True
        future = self.grammars.future(key)
        if not future.done():
            return False
        future.result()  # raises the ConfigError of a grammar that did not compile
        return True

    def admissible_drafts(self, req, drafts: list[int]) -> list[int]:
        if req.params.constraint is None or not drafts:
            return drafts
        state = self._state(req)
        if state.active_from is None:
            after = req.params.constraint_after_token_id
            return drafts[:drafts.index(after)] if after in drafts else drafts
        matcher, accepted = state.matcher, 0
        if state.failed or matcher.is_terminated():
            return []
        for token in drafts:
            if not matcher.accept_token(token):
                break
            accepted += 1
            if matcher.is_terminated():
                break
        kept = accepted - 1 if matcher.is_terminated() else accepted
        matcher.rollback(accepted)
        return drafts[:kept]

    def masks(self, reqs: list, sample: list[bool], drafts: list[list[int]] | None = None) -> tuple[list[int], bytes] | None:
        drafts = drafts or [[] for _ in reqs]
        rows = [i for i, (req, s) in enumerate(zip(reqs, sample))
                if s and req.params.constraint is not None and self._state(req).active_from is not None]
        if not rows:
            return None
        import xgrammar as xgr

        sizes = [1 + len(drafts[i]) for i in rows]
        bitmask = xgr.allocate_token_bitmask(sum(sizes), self.grammars.vocab_size)  # int32 [rows, ceil(V / 32)]
        row = 0
        for i in rows:
            matcher = self._states[reqs[i].rid].matcher
            matcher.fill_next_token_bitmask(bitmask, row)
            for token in drafts[i]:  # admissible: each is accepted, and none ends the grammar
                if not matcher.accept_token(token):
                    raise ValueError(f"draft {token} of request {reqs[i].rid!r} is refused by its grammar")
                row += 1
                matcher.fill_next_token_bitmask(bitmask, row)
            matcher.rollback(len(drafts[i]))
            row += 1
        return rows, bitmask.numpy().tobytes()

    def accept(self, req, token: int) -> dict | None:
        if req.params.constraint is None:
            return None
        state = self._state(req)  # replays every output token, the new one included
        if state.failed:
            return {"type": "abort", "message": f"the grammar refused token {token} (a bug: the mask allows none "
                                                f"it refuses)"}
        if state.active_from is not None and state.matcher.is_terminated():
            return {"type": "stop", "matched": token}
        return None

    def reset(self, req) -> None:
        self._states.pop(req.rid, None)

    def release(self, req) -> None:
        self._states.pop(req.rid, None)

    # ---- matchers ----------------------------------------------------------------------------------------
    def _state(self, req) -> _State:
        """req's matcher, brought up to date with req.output_ids (built from them when there is none)."""
        state = self._states.get(req.rid)
        if state is None or state.consumed > len(req.output_ids):
            import xgrammar as xgr

            after = req.params.constraint_after_token_id
            state = self._states[req.rid] = _State(xgr.GrammarMatcher(self.grammars.get(req.params.constraint)),
                                                   active_from=0 if after is None else None)
        after = req.params.constraint_after_token_id
        for index in range(state.consumed, len(req.output_ids)):
            token = req.output_ids[index]
            if state.active_from is None:
                if token == after:
                    state.active_from = index + 1
            elif not state.failed and not state.matcher.is_terminated():
                state.failed = not state.matcher.accept_token(token)
        state.consumed = len(req.output_ids)
        return state

    def shutdown(self) -> None:
        if self._grammars is not None:
            self._grammars.shutdown()
