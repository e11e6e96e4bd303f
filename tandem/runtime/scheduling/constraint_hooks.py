"""The interface through which the scheduler (pure Python) uses structured output: `ConstraintHooks`. The
implementation (`tandem.runtime.constraints.tracker.ConstraintTracker`, which uses the grammar library and may
import torch) is given to the `Scheduler` by the engine; without one, a request with a constraint is refused.

The driver alone decides (as SGLang #28424 shows, ranks deciding grammar readiness on their own schedule
different batches): which requests may be admitted (their grammar is compiled), the token mask of each
constrained row of a step, and when a grammar has ended its request."""

from __future__ import annotations

from typing import Protocol


class ConstraintHooks(Protocol):
    def ready(self, req) -> bool:
        """Whether req may be admitted: it has no constraint, or its grammar is compiled. Starts the compile
        when it is not. ConfigError when the grammar does not compile."""

    def admissible_drafts(self, req, drafts: list[int]) -> list[int]:
        """The longest prefix of `drafts` (speculative decoding) that req's grammar can verify: each draft
        allowed after the ones before it, and none ending the grammar."""

    def masks(self, reqs: list, sample: list[bool], drafts: list[list[int]] | None = None) -> tuple[list[int], bytes] | None:
        """For a step over `reqs` (sample[i]: row i samples a token; drafts[i]: its verify span's admissible
        drafts): the indices of the rows whose tokens the grammar constrains, and their packed bitmasks
        (int32 [sum of 1 + len(drafts[i]) over those rows, ceil(V / 32)], little-endian; bit j of word w allows
        token 32 w + j; a verify span's rows are its positions in order); None when no row is constrained."""

    def accept(self, req, token: int) -> dict | None:
        """Advance req's matcher with its new output token (already appended to req.output_ids); a finish
        reason when the grammar has ended the request, else None."""

    def reset(self, req) -> None:
        """Forget req's matcher (preempted or requeued): it is rebuilt from req.output_ids when next needed."""

    def release(self, req) -> None:
        """req finished: drop its matcher."""
