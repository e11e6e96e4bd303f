"""Batched top-k / min-p / top-p filtering against a row-by-row reference that sorts the whole vocabulary,
on vocabularies smaller and larger than the nucleus candidate set (so both of its paths run)."""

import pytest
import torch

from tandem.runtime.sampling.filters import NUCLEUS_CANDIDATES, filter_probs
from tandem.runtime.sampling.params import SamplingParams


def reference_filter(probs: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row: top-k (ties kept), then min-p, then top-p over a full descending sort."""
    probs = probs.clone()
    if p.top_k > 0:
        kth = torch.topk(probs, min(p.top_k, probs.numel())).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if p.min_p > 0:
        probs = torch.where(probs >= p.min_p * probs.max(), probs, 0.0)
    if p.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        total = sorted_probs.sum()
        drop = (torch.cumsum(sorted_probs, 0) - sorted_probs) / total >= p.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return probs


SETTINGS = [dict(), dict(top_k=1), dict(top_k=7), dict(top_k=10 ** 6), dict(min_p=0.3), dict(top_p=0.5),
            dict(top_p=0.95), dict(top_k=40, top_p=0.8), dict(top_k=5, min_p=0.5), dict(min_p=0.05, top_p=0.9),
            dict(top_k=300, min_p=0.01, top_p=0.99)]


@pytest.mark.parametrize("vocab_size,scale", [(50, 2.0), (NUCLEUS_CANDIDATES * 3, 0.5), (NUCLEUS_CANDIDATES * 3, 6.0)])
def test_filters_equal_the_row_by_row_reference(vocab_size, scale):
    """scale 0.5 over 3072 tokens: the top 1024 hold too little mass, so top-p sorts the whole row;
    scale 6.0: peaked rows, where the candidates suffice."""
    generator = torch.Generator().manual_seed(vocab_size)
    params = [SamplingParams(temperature=1.0, **kw) for kw in SETTINGS]
    probs = torch.softmax(torch.randn(len(params), vocab_size, generator=generator) * scale, dim=-1)
    filtered = filter_probs(probs.clone(), params)
    for row, p in enumerate(params):
        expected = reference_filter(probs[row], p)
        assert torch.equal(filtered[row] > 0, expected > 0), (row, SETTINGS[row])
        assert torch.equal(filtered[row][expected > 0], probs[row][expected > 0])


def test_ties_with_a_threshold_are_kept():
    probs = torch.tensor([[0.4, 0.2, 0.2, 0.2, 0.0], [0.5, 0.2, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1, 0.0]])
    params = [SamplingParams(top_p=0.5), SamplingParams(top_k=3), SamplingParams(min_p=0.25)]
    kept = filter_probs(probs.clone(), params) > 0
    assert kept[0].tolist() == [True, True, True, True, False]  # the 2nd token reaches 0.5; its ties stay
    assert kept[1].tolist() == [True, True, True, True, True]  # the 3rd largest is tied with the 4th and 5th
    assert kept[2].tolist() == [True, True, True, True, False]  # 0.1 >= 0.25 * 0.4
