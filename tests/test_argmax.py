"""`row_argmax` against torch.argmax: random rows, rows full of ties (the first index must win), widths that
are not a multiple of the block (the maximum in the partial last block, or on its last entry), narrow rows,
rows of -inf."""

from __future__ import annotations

import pytest
import torch

from tandem.runtime.sampling.argmax import BLOCK, row_argmax


@pytest.mark.parametrize("width", [1, 5, BLOCK, BLOCK + 1, 3 * BLOCK - 7, 32000, 32003])
def test_random_rows_match_torch(width):
    x = torch.randn(17, width, generator=torch.Generator().manual_seed(width))
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))


@pytest.mark.parametrize("width", [BLOCK * 4, BLOCK * 4 + 37])
def test_ties_give_the_first_index(width):
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 4, (64, width), generator=gen).float()  # every row has its maximum many times
    x[5] = 0.0  # all equal
    x[6, -1] = 9.0  # the maximum on the last entry, inside the partial block when there is one
    x[7, -2:] = 9.0
    x[8, BLOCK - 1] = x[8, BLOCK] = 9.0  # tied across a block boundary
    x[9] = float("-inf")
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))
    assert row_argmax(x)[6] == width - 1 and row_argmax(x)[8] == BLOCK - 1


def test_bfloat16_and_views():
    x = torch.randn(8, 1000, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))
    wide = torch.randn(8, 1200, generator=torch.Generator().manual_seed(3))
    view = wide[:, 100:1100]  # rows that are not contiguous with each other
    assert torch.equal(row_argmax(view), view.argmax(dim=-1))
