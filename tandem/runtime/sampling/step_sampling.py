"""What the last stage does with a step's final hidden states: one `compute_logits` over the rows that end a
request's tokens and the prompt rows that want logprobs (one vocabulary all-gather across TP ranks), the
sampler over the former (with the step's structured-output token masks), prompt logprobs over the latter,
gathered into the step's `StepOutput`; verify spans (speculative decoding) have logits at every one of
their positions, judged by `verify_step.judge_spans`. Shared by `ModelRunner` and the `auto-latency` probe,
which times exactly this path."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from tandem.layers.forward_batch import ForwardBatch
from tandem.runtime.sampling.logprobs import grouped_token_logprobs
from tandem.runtime.sampling.sampler import Sampler
from tandem.runtime.sampling.token_mask import step_token_masks
from tandem.runtime.sampling.verify_step import judge_spans
from tandem.runtime.step import StepInput, StepOutput


def sample_step(compute_logits: Callable[[torch.Tensor], torch.Tensor], sampler: Sampler, params: Mapping,
                step: StepInput, batch: ForwardBatch, hidden: torch.Tensor) -> StepOutput:
    """`params`: request key -> its SamplingParams (kept from the step that admitted it)."""
    num_spans = len(step.spans)
    verify = [i for i in range(num_spans) if step.num_drafts(i)]
    sampled = [i for i, s in enumerate(step.sample) if s and not step.num_drafts(i)]
    scored = prompt_logprob_targets(step, batch)
    top_nums = step.top_logprobs_num or [0] * num_spans
    want_logprobs = step.want_logprobs or [True] * num_spans
    last_rows = batch.last_token_indices()
    verify_rows = [torch.arange(batch.offsets[i], batch.offsets[i] + step.spans[i].num_tokens) for i in verify]
    rows = [last_rows[sampled]] + [torch.arange(batch.offsets[i], batch.offsets[i] + len(targets))
                                   for i, targets in scored] + verify_rows
    row_index = torch.cat(rows).to(hidden.device)
    logits = compute_logits(hidden[row_index]) if len(row_index) else None
    num_verify_rows = sum(len(r) for r in verify_rows)
    tokens: list = [None] * num_spans
    logprobs: list = [None] * num_spans
    tops: list = [None] * num_spans
    errors: list = [None] * num_spans
    masks = step_token_masks(step.bitmask_rows, step.token_bitmask, sampled, logits.shape[-1], logits.device,
                             step.num_drafts) if step.bitmask_rows else None
    if sampled:
        result = sampler.sample(logits[:len(sampled)], [params[step.keys[i]] for i in sampled],
                                [step.keys[i] for i in sampled], [top_nums[i] for i in sampled],
                                [want_logprobs[i] for i in sampled], token_mask=masks.sampled if masks else None)
        for j, i in enumerate(sampled):
            tokens[i], logprobs[i] = result.tokens[j], result.logprobs[j]
            tops[i], errors[i] = result.top_logprobs[j], result.errors[j]
    input_lps = input_tops = None
    if step.input_logprobs and any(step.input_logprobs):
        input_lps, input_tops = [None] * num_spans, [None] * num_spans
        prompt_rows = logits[len(sampled):len(logits) - num_verify_rows]
        groups = grouped_token_logprobs(prompt_rows, [t for _, targets in scored for t in targets],
                                        [len(targets) for _, targets in scored], [top_nums[i] for i, _ in scored])
        for (i, _), group in zip(scored, groups):
            input_lps[i], input_tops[i] = group.logprobs, group.top_logprobs
            if group.error and errors[i] is None:
                tokens[i] = logprobs[i] = tops[i] = None
                errors[i] = group.error
        if not any(t is not None for t in input_tops):
            input_tops = None
    spec_tokens = spec_logprobs = None
    spec_tops: list = [None] * num_spans
    if verify:
        spec_tokens, spec_logprobs = [None] * num_spans, [None] * num_spans
        prompt_lens = step.prompt_lens or [0] * num_spans
        verdicts = judge_spans(logits[len(logits) - num_verify_rows:], [step.drafts[i] for i in verify],
                               [params[step.keys[i]] for i in verify],
                               [step.spans[i].prefix_len + 1 - prompt_lens[i] for i in verify],
                               [want_logprobs[i] for i in verify], sampler.generator, step.spec_seed,
                               [top_nums[i] for i in verify], [sampler.histories[step.keys[i]] for i in verify],
                               [masks.spans.get(i) for i in verify] if masks else None)
        for i, verdict in zip(verify, verdicts):
            spec_tokens[i], spec_logprobs[i], errors[i] = verdict.tokens, verdict.logprobs, verdict.error
            spec_tops[i] = verdict.top_logprobs
    return StepOutput(tokens, logprobs, input_lps, tops, errors, input_tops, spec_tokens, spec_logprobs,
                      spec_top_logprobs=spec_tops if any(t is not None for t in spec_tops) else None)


def prompt_logprob_targets(step: StepInput, batch: ForwardBatch) -> list[tuple[int, list[int]]]:
    """(span index, target ids) of each span that wants its prompt tokens' logprobs: row k of the span is
    scored against the token after it (the span's next token, or for its last row the prompt token after the
    span, when there is one)."""
    if not step.input_logprobs:
        return []
    scored = []
    for i, wanted in enumerate(step.input_logprobs):
        if not wanted:
            continue
        offset, n = batch.offsets[i], step.spans[i].num_tokens
        targets = step.input_ids[offset + 1:offset + n]
        if step.next_ids and step.next_ids[i] is not None:
            targets = [*targets, step.next_ids[i]]
        scored.append((i, list(targets)))
    return scored
