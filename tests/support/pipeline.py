"""Reading the pipeline's order of work from what the ranks record (`stage_report()["steps_run"]`: the step
ids each rank ran, and whether the driver's next message had already reached it when it finished one),
so that overlap between stages is asserted from an order of events, not from the clocks of processes."""

from __future__ import annotations


def steps_sent_ahead(report: list[dict]) -> list[int]:
    """Ids of the steps i for which the driver had sent step i + 1 before the last stage finished step i.

    The last stage records, when it has computed step i and before it sends the Result of step i, whether
    the next step is already in its queue. With one step in flight that cannot be: the driver sends step
    i + 1 only after that Result. When it is, stage 0 held step i + 1 while the last stage still computed
    step i, which it could start only once stage 0 had finished (and sent) its part of step i: stage 0 was
    free to compute step i + 1 meanwhile. Every rank runs every step, in order: the ids are consecutive."""
    last = report[-1]
    assert last["pp_rank"] == last["pp_size"] - 1, last["pp_rank"]
    ids = [step_id for step_id, _ in last["steps_run"]]
    assert len(ids) > 1 and ids == list(range(ids[0], ids[0] + len(ids))), ids
    for stage in report[:-1]:  # the other ranks ran the same steps
        assert [step_id for step_id, _ in stage["steps_run"]] == ids
    return [step_id for step_id, queued in last["steps_run"] if queued and step_id != ids[-1]]
