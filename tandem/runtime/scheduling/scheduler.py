"""`Scheduler`: continuous batching over a paged KV cache, as the orchestration of small managers (the shape
of mini-sglang's scheduler package). It owns the queues and the limits; each decision is one manager's:

- `AdmissionManager` (admission.py): which waiting requests start, by tokens, against the prefix cache;
- `PreemptionManager` (preemption.py): a page for each decoding request, retracting the newest if needed;
- `StepPlanner` (step_planner.py): the next step's decode tokens and prefill chunks, as a `StepInput`;
- `ResultHandler` (results.py): a step's tokens and logprobs appended, stops checked, requests finished;
- `CacheManager` (cache_manager.py): every page, slot and prefix-cache decision, made once for all stages;
- `Speculation` (speculation.py), with speculative decoding: drafts, refused combinations, and the commits
  and page trims of judged verify spans that the next step carries.

`requeue_all()` forgets every cache (the ranks were restarted): running requests go back to the front of
the queue and are prefilled again from their prompt plus the tokens they already generated; `use_cache`
then plans with the fresh ranks' capacity."""

from __future__ import annotations

from collections.abc import Callable

from tandem.errors import ConfigError
from tandem.runtime.scheduling.admission import AdmissionManager
from tandem.runtime.scheduling.cache_manager import CacheManager
from tandem.runtime.scheduling.constraint_hooks import ConstraintHooks
from tandem.runtime.scheduling.preemption import PreemptionManager
from tandem.runtime.scheduling.queues import Counters, Queues
from tandem.runtime.scheduling.request import Request, RequestLimits
from tandem.runtime.scheduling.results import ResultHandler
from tandem.runtime.scheduling.speculation import Speculation
from tandem.runtime.scheduling.step_planner import StepPlanner
from tandem.runtime.step import StepInput, StepOutput

__all__ = ["Request", "Scheduler"]  # Request is imported from here by the server, the benchmarks and tests


class Scheduler:
    def __init__(self, cache: CacheManager, context_length: int, chunk_size: int, eos_token_ids=(),
                 decode_text: Callable[[list[int]], str] | None = None, constraints: ConstraintHooks | None = None,
                 speculation: Speculation | None = None):
        self.chunk_size = chunk_size
        self.speculation = speculation  # speculative decoding, None when off
        self.constraints = constraints  # structured output (grammar readiness, masks, matchers); None: refused
        self.eos_token_ids = set(eos_token_ids)
        self.decode_text = decode_text
        self.queues = Queues()
        self.counters = Counters()
        self.use_cache(cache, context_length)

    def use_cache(self, cache: CacheManager, context_length: int) -> None:
        """Plan with `cache` (a fresh one after the ranks were restarted, when nothing runs) and its limits."""
        self.cache = cache
        self.limits = RequestLimits(context_length, cache.max_total_tokens)
        self.results = ResultHandler(self.queues, cache, self.limits, self.eos_token_ids, self.decode_text,
                                     self.constraints, self.speculation)
        self.admission = AdmissionManager(self.queues, cache, self.limits, self.counters, self.constraints,
                                          self.results.finish)
        self.preemption = PreemptionManager(self.queues, cache, self.counters, self.constraints)
        self.planner = StepPlanner(self.queues, cache, self.preemption, self.chunk_size, self.constraints,
                                   self.speculation, self.limits)

    @property
    def max_len(self) -> int:
        """Tokens (prompt + output) one request may reach."""
        return self.limits.max_len

    @property
    def waiting(self):
        return self.queues.waiting

    @property
    def running(self) -> list[Request]:
        return self.queues.running

    @property
    def has_work(self) -> bool:
        return bool(self.queues.waiting or self.queues.running)

    # ---- requests in and out ------------------------------------------------------------------------------
    def check_prompt(self, num_tokens: int) -> None:
        """ConfigError when a prompt of `num_tokens` tokens cannot run under the current limits (the one
        check: `PromptBuilder` asks it too, to name the request field)."""
        self.limits.check_prompt(num_tokens)

    def add(self, req: Request) -> None:
        self.check_prompt(len(req.prompt_ids))
        if req.params.constraint is not None and self.constraints is None:
            raise ConfigError(f"{req.params.constraint[0]}: structured output is not available in this scheduler")
        if self.speculation is not None:
            req.speculative = True
        if req.params.max_new_tokens == 0 and not req.input_logprobs_wanted:
            req.finish_reason = {"type": "length", "length": 0}
            return
        self.queues.waiting.append(req)

    def abort(self, rid, message: str | None = None) -> bool:
        """Finish request `rid` with {"type": "abort"} (plus `message`, the reason, when the engine ends it
        rather than its client). False if there is no such unfinished request."""
        for req in self.queues.unfinished():
            if req.rid == rid:
                self.results.finish(req, {"type": "abort", "message": message} if message else {"type": "abort"})
                return True
        return False

    def requeue_all(self) -> list[Request]:
        """Every cache is gone (the ranks were restarted): forget every page, slot and prefix, and put the
        running requests back at the front of the queue, in the order they were admitted, to be prefilled
        again from position 0 (prompt + tokens already generated; the sampler rebuilds its history from what
        is fed through the model). Returns them."""
        requeued = list(self.queues.running)
        self.cache.reset(requeued)
        if self.speculation is not None:
            self.speculation.reset()
        for req in requeued:
            req.forget_progress()
            if self.constraints is not None:
                self.constraints.reset(req)  # rebuilt from its output tokens when it runs again
        self.queues.waiting.extendleft(reversed(requeued))
        self.queues.running.clear()
        self.queues.released.clear()  # the fresh ranks hold no state for them
        return requeued

    # ---- steps --------------------------------------------------------------------------------------------
    def next_step(self, busy: set = frozenset(), num_micro_batches: int = 1) -> tuple[StepInput, list[Request]] | None:
        """Plan one step over requests not in `busy` (their previous step is still in flight). With
        micro-batches, each step takes about 1/num_micro_batches of the running requests."""
        for _ in range(2):  # a retraction can leave nothing to run; admitting again then finds work
            self.admission.admit()
            planned = self.planner.plan(busy, num_micro_batches)
            if planned is not None or busy or not self.has_work:
                return planned
        return None

    def process(self, step: StepInput, reqs: list[Request], out: StepOutput) -> list[Request]:
        """Apply a step's results (see `ResultHandler.process`); returns the requests it changed."""
        return self.results.process(step, reqs, out)

    # ---- statistics ---------------------------------------------------------------------------------------
    def stats(self) -> dict:
        cache, counters = self.cache, self.counters
        return {
            "max_total_tokens": cache.max_total_tokens, "page_size": cache.page_size,
            "max_running_requests": cache.max_running_requests, "num_state_slots": cache.num_state_slots,
            "used_pages": cache.used_pages, "num_pages": cache.num_pages,
            "cached_pages": cache.prefix_cache.total_cached_pages,
            "running": len(self.queues.running), "waiting": len(self.queues.waiting),
            "preemptions": counters.preemptions, "radix_cache": cache.radix_cache,
            "prefix_cache_queries": counters.prefix_queries,
            "prefix_cache_query_tokens": counters.prefix_query_tokens,
            "prefix_cache_hit_tokens": counters.prefix_hit_tokens,
            **self._spec_stats(),
        }

    def _spec_stats(self) -> dict:
        """Speculative decoding's totals: verify passes, drafts proposed and accepted, and the mean tokens a
        verify pass emits (accept length: its accepted drafts plus the target's own token)."""
        if self.speculation is None:
            return {}
        c = self.speculation.counters
        return {"spec_verify_passes": c.verify_passes, "spec_proposed_drafts": c.proposed_drafts,
                "spec_accepted_drafts": c.accepted_drafts,
                "spec_accept_length": (c.accepted_drafts + c.verify_passes) / c.verify_passes if c.verify_passes
                else 0.0,
                "spec_accept_rate": c.accepted_drafts / c.proposed_drafts if c.proposed_drafts else 0.0}
