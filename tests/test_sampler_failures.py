"""Numeric failures stay in their row: a row whose logits (or adjusted logits, or sampling distribution)
are not finite gets an error and no token; the other rows get exactly the tokens they get alone. Also:
the sampler runs on the device of the logits (CPU here, and CUDA where present)."""

import pytest
import torch

from tandem.runtime.sampling.sampler import (
    ADJUSTED_LOGITS_ERROR,
    DISTRIBUTION_ERROR,
    RAW_LOGITS_ERROR,
    Sampler,
    SamplingParams,
    draw_seed,
)

VOCAB = 64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

NEIGHBOURS = [SamplingParams(temperature=0), SamplingParams(temperature=0.9, seed=17),
              SamplingParams(temperature=1.2, top_p=0.8, seed=-3), SamplingParams(temperature=0, presence_penalty=1.5),
              SamplingParams(temperature=0.5, top_k=4, repetition_penalty=1.4, seed=2 ** 70)]


def run(logits: torch.Tensor, params: list[SamplingParams], top_n: int = 3):
    sampler = Sampler()
    for key, p in enumerate(params):
        sampler.begin(key, p, prompt_len=2)
        sampler.observe(key, [1, 5, 3], 0)  # one generated token (3), so penalties have work to do
    return sampler.sample(logits, params, list(range(len(params))), top_logprobs_num=[top_n] * len(params))


def bad_row(kind: str) -> tuple[torch.Tensor, SamplingParams, str]:
    row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(9))
    p = SamplingParams(temperature=0.8, seed=1)
    if kind == "nan":
        row[5] = float("nan")
        return row, p, RAW_LOGITS_ERROR
    if kind == "inf":
        row[7] = float("inf")
        return row, p, RAW_LOGITS_ERROR
    if kind == "all -inf":
        return torch.full((VOCAB,), -float("inf")), SamplingParams(temperature=0), RAW_LOGITS_ERROR
    if kind == "penalty overflow":  # 1e30 / 1e-30 is +inf in float32
        row[3] = 1e30
        return row, SamplingParams(temperature=0, repetition_penalty=1e-30), ADJUSTED_LOGITS_ERROR
    if kind == "temperature overflow":  # 1e34 / 1e-5 is +inf in float32: softmax gives NaN
        row[3] = 1e34
        return row, SamplingParams(temperature=1e-5, seed=4), DISTRIBUTION_ERROR
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["nan", "inf", "all -inf", "penalty overflow", "temperature overflow"])
@pytest.mark.parametrize("position", [0, 2, 5])
def test_a_failing_row_does_not_affect_the_others(kind, position):
    logits = torch.randn(len(NEIGHBOURS), VOCAB, generator=torch.Generator().manual_seed(2)) * 3
    alone = run(logits, NEIGHBOURS)
    assert alone.errors == [None] * len(NEIGHBOURS)
    row, p, error = bad_row(kind)
    mixed_logits = torch.cat([logits[:position], row[None], logits[position:]])
    mixed = run(mixed_logits, NEIGHBOURS[:position] + [p] + NEIGHBOURS[position:])
    assert mixed.errors[position] == error
    assert mixed.tokens[position] is None and mixed.logprobs[position] is None
    assert mixed.top_logprobs[position] is None
    others = [i for i in range(len(mixed.tokens)) if i != position]
    assert [mixed.tokens[i] for i in others] == alone.tokens
    assert [mixed.logprobs[i] for i in others] == pytest.approx(alone.logprobs)
    assert [mixed.errors[i] for i in others] == [None] * len(NEIGHBOURS)


def test_a_batch_of_failing_rows_returns_only_errors():
    logits = torch.full((3, VOCAB), float("nan"))
    result = run(logits, [SamplingParams(temperature=0), SamplingParams(seed=1), SamplingParams()])
    assert result.tokens == [None] * 3 and result.errors == [RAW_LOGITS_ERROR] * 3


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_on_the_device_of_the_logits(device):
    """Seeded draws use a generator on the logits' device and equal a direct draw there."""
    logits = (torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(4)) * 2).to(device)
    params = [SamplingParams(temperature=0.7, seed=10 ** 30), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0, seed=8)]
    result = run(logits, params, top_n=2)
    assert result.errors == [None] * 3
    assert result.tokens[1] == int(logits[1].argmax())
    for row in (0, 2):
        generator = torch.Generator(device=device).manual_seed(draw_seed(params[row].seed, 1))
        probs = torch.softmax(logits[row] / params[row].temperature, dim=-1)
        assert result.tokens[row] == int(torch.multinomial(probs, 1, generator=generator))
