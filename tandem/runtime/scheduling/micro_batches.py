"""`MicroBatchWindow`: the pipeline's in-flight steps, one per micro-batch slot (the shape of SGLang's
`scheduler_pp_mixin`: each of the `num_micro_batches` slots holds at most one step between its submission
and its results). A request is in one in-flight step at a time, except for the consecutive prefill chunks
of a long prompt (`StepPlanner._next_chunk_can_follow`).

With `pp_size = P` stages and P slots, the driver keeps every stage busy. Stage k runs a step after stage
k - 1 has sent it on; the last stage's results come back to the driver, which then plans that slot's next
step (its requests are free again) and submits it while the other slots are still on their way:

    time ->      t0    t1    t2    t3    t4
    stage 0      s0    s1    s2    s3    s4
    stage 1      .     s0    s1    s2    s3
    driver             s0 in s1 in s2 in s3 in

(P = 2; step sN uses slot N mod P. "s0 in" at the end of t1: s0's tokens are appended and s2, the next
step of s0's requests, is planned and submitted, so stage 0 starts it at t2.) With one slot (pp_size 1)
the driver plans the next step while nothing is in flight. The window only plans, submits and collects:
the engine's loop holds the lock around planning and processing, and restarts the ranks when the executor
fails."""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from tandem.runtime.scheduling.request import Request
from tandem.runtime.scheduling.scheduler import Scheduler
from tandem.runtime.step import StepInput, StepOutput


class Landed(NamedTuple):
    """A step whose results came back."""

    step: StepInput
    reqs: list[Request]
    out: StepOutput


class MicroBatchWindow:
    def __init__(self, scheduler: Scheduler, num_micro_batches: int):
        self.scheduler, self.num_micro_batches = scheduler, num_micro_batches
        self._in_flight: deque[tuple[object, StepInput, list[Request]]] = deque()  # oldest first

    def __len__(self) -> int:
        return len(self._in_flight)

    def busy(self) -> set:
        """Keys of the requests in flight."""
        return {req.rid for _, _, reqs in self._in_flight for req in reqs}

    def fill(self, executor) -> None:
        """Plan and submit steps until every slot is taken or nothing is ready (call it under the lock that
        guards the scheduler)."""
        busy = self.busy()
        while len(self._in_flight) < self.num_micro_batches:
            planned = self.scheduler.next_step(busy, self.num_micro_batches)
            if planned is None:
                return
            step, reqs = planned
            self._in_flight.append((executor.submit(step), step, reqs))
            busy.update(req.rid for req in reqs)

    def collect(self, executor) -> Landed:
        """Wait for the oldest step's results (the ranks run steps in order); its slot is free again."""
        step_id, step, reqs = self._in_flight.popleft()
        return Landed(step, reqs, executor.collect(step_id))

    def drop(self) -> None:
        """Forget the steps in flight (they died with the ranks; their requests are requeued)."""
        self._in_flight.clear()
