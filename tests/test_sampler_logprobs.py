"""Reported logprobs against direct log_softmax / topk per row: chosen-token and top-N logprobs of sampled
rows (only for the rows that want them, with the same tokens either way), and target / top-N logprobs of
prompt tokens."""

import pytest
import torch

from tandem.runtime.sampling import logprobs as logprobs_module
from tandem.runtime.sampling.logprobs import token_logprobs
from tandem.runtime.sampling.sampler import RAW_LOGITS_ERROR, Sampler, SamplingParams

VOCAB = 40


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 4


def begun(params, keys) -> Sampler:
    sampler = Sampler()
    for p, key in zip(params, keys):
        sampler.begin(key, p, prompt_len=1)
    return sampler


def test_top_logprobs_per_row_equal_topk_of_log_softmax():
    logits = random_logits(6)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(temperature=0, frequency_penalty=1.0), SamplingParams(temperature=1.0, top_k=3, seed=2),
              SamplingParams(temperature=0, logit_bias={0: 100}), SamplingParams(temperature=2.0, seed=3)]
    nums = [0, 1, 5, 20, 3, VOCAB + 10]
    keys = list(range(6))
    result = begun(params, keys).sample(logits, params, keys, top_logprobs_num=nums)
    for row, n in enumerate(nums):
        reference = torch.log_softmax(logits[row], dim=-1)
        assert result.logprobs[row] == pytest.approx(float(reference[result.tokens[row]]), abs=1e-6)
        if n == 0:
            assert result.top_logprobs[row] is None
            continue
        top = torch.topk(reference, min(n, VOCAB))
        assert [t for t, _ in result.top_logprobs[row]] == top.indices.tolist()
        assert [lp for _, lp in result.top_logprobs[row]] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert result.tokens[4] == 0, "logit_bias chose the token; the logprob stays the raw one"


def test_top_logprobs_use_one_topk_for_the_batch(monkeypatch):
    calls = []
    real_topk = torch.topk

    def counting_topk(*args, **kwargs):
        calls.append(args[1] if len(args) > 1 else kwargs["k"])
        return real_topk(*args, **kwargs)

    monkeypatch.setattr(logprobs_module.torch, "topk", counting_topk)
    params = [SamplingParams(temperature=0)] * 5
    begun(params, range(5)).sample(random_logits(5), params, list(range(5)), top_logprobs_num=[2, 0, 7, 1, 7])
    assert calls == [7]


@pytest.mark.parametrize("wants", [[False] * 6, [True, False, False, True, False, True]], ids=["none", "some"])
def test_logprobs_only_for_rows_that_want_them_and_the_same_tokens(monkeypatch, wants):
    logits = random_logits(6, seed=4)
    logits[2, 7] = logits[2].max() + 5  # a clear winner where a row mixes in penalties and bias below
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, logit_bias={3: 50}),
              SamplingParams(temperature=0, presence_penalty=1.5), SamplingParams(temperature=0.8, seed=7),
              SamplingParams(temperature=0), SamplingParams(temperature=0)]
    nums = [0, 0, 0, 0, 2, 0]  # a row asking for top-N alternatives reports its logprobs whatever `wants` says
    keys = list(range(6))
    full = begun(params, keys).sample(logits, params, keys, top_logprobs_num=nums)
    softmax_rows = []
    real_log_softmax = torch.log_softmax

    def counting_log_softmax(x, *args, **kwargs):
        softmax_rows.append(x.shape[0])
        return real_log_softmax(x, *args, **kwargs)

    monkeypatch.setattr(torch, "log_softmax", counting_log_softmax)
    partial = begun(params, keys).sample(logits, params, keys, top_logprobs_num=nums, want_logprobs=wants)
    reported = [w or n > 0 for w, n in zip(wants, nums)]
    assert softmax_rows == [sum(reported)]
    assert partial.tokens == full.tokens
    assert full.tokens[:3] == [int(logits[0].argmax()), 3, 7]  # greedy rows: argmax of the adjusted logits
    reference = torch.log_softmax(logits, dim=-1)
    for row, want in enumerate(reported):
        if not want:
            assert partial.logprobs[row] is None and partial.top_logprobs[row] is None
            continue
        assert partial.logprobs[row] == pytest.approx(float(reference[row, full.tokens[row]]), abs=1e-6)
        assert partial.top_logprobs[row] == full.top_logprobs[row]
    assert partial.errors == full.errors == [None] * 6


def test_rows_with_non_finite_logits_fail_without_logprobs_wanted():
    logits = random_logits(4, seed=5)
    logits[0, 3] = float("nan")
    logits[1, 5] = float("inf")
    logits[2] = float("-inf")
    params = [SamplingParams(temperature=0)] * 4
    result = begun(params, range(4)).sample(logits, params, list(range(4)), want_logprobs=[False] * 4)
    assert result.errors[:3] == [RAW_LOGITS_ERROR] * 3
    assert result.tokens[:3] == [None] * 3 and result.errors[3] is None
    assert result.tokens[3] == int(logits[3].argmax()) and result.logprobs[3] is None


@pytest.mark.parametrize("top_n", [0, 1, 4])
def test_prompt_token_logprobs(top_n):
    logits = random_logits(9, seed=5)
    targets = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(6)).tolist()
    out = token_logprobs(logits, targets, top_n)
    reference = torch.log_softmax(logits, dim=-1)
    assert out.error is None
    assert out.logprobs == pytest.approx([float(reference[i, t]) for i, t in enumerate(targets)], abs=1e-6)
    if top_n == 0:
        assert out.top_logprobs is None
    else:
        for i in range(9):
            top = torch.topk(reference[i], top_n)
            assert [t for t, _ in out.top_logprobs[i]] == top.indices.tolist()
            assert [lp for _, lp in out.top_logprobs[i]] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_prompt_token_logprobs_of_non_finite_logits_report_an_error():
    logits = random_logits(3)
    logits[1, 4] = float("nan")
    out = token_logprobs(logits, [0, 1, 2], top_n=2)
    assert out.error and "NaN" in out.error and out.logprobs == [] and out.top_logprobs is None


def test_prompt_token_logprobs_reject_bad_shapes_and_ids():
    logits = random_logits(3)
    with pytest.raises(ValueError):
        token_logprobs(logits, [0, 1])
    with pytest.raises(ValueError):
        token_logprobs(logits, [0, 1, VOCAB])
    assert token_logprobs(logits[:0], []).logprobs == []
