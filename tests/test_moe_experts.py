"""`StackedExperts`: the padded batched-product path, the grouped-GEMM path and the per-expert path against a
direct per-token float64 computation of sum_k w_k * down_e(silu(gate_e(x)) * up_e(x)), including experts nobody
routes to; which batch sizes take the padded path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tandem.layers import moe
from tandem.layers.moe import StackedExperts
from tandem.parallel.layout import GroupInfo


def experts(num_experts: int, hidden: int, inter: int, dtype: torch.dtype) -> StackedExperts:
    torch.manual_seed(0)
    module = StackedExperts(GroupInfo.alone(), num_experts, hidden, inter)
    with torch.no_grad():
        module.gate_up_proj.copy_(torch.randn(num_experts, 2 * inter, hidden) * hidden ** -0.5)
        module.down_proj.copy_(torch.randn(num_experts, hidden, inter) * inter ** -0.5)
    return module.to(dtype)


def routing(num_tokens: int, num_experts: int, top_k: int, dtype, unused: tuple[int, ...] = ()):
    logits = torch.randn(num_tokens, num_experts)
    logits[:, list(unused)] = float("-inf")
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    return ids, (weights / weights.sum(-1, keepdim=True)).to(dtype)


def reference(module: StackedExperts, x, ids, weights) -> torch.Tensor:
    gate_up, down = module.gate_up_proj.double(), module.down_proj.double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t].tolist(), weights[t].double()):
            gate, up = (gate_up[e] @ x[t].double()).chunk(2)
            out[t] += w * (down[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("num_tokens", [1, 5, 40])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_padded_grouped_and_per_expert_paths_match_the_reference(monkeypatch, num_tokens, dtype, tolerance):
    module = experts(num_experts=8, hidden=32, inter=16, dtype=dtype)
    x = torch.randn(num_tokens, 32).to(dtype)
    ids, weights = routing(num_tokens, 8, 3, dtype, unused=(2, 5))
    expected = reference(module, x, ids, weights)
    scale = expected.abs().max().item()
    taken = []
    for name in ("padded", "_grouped", "per_expert"):
        real = getattr(StackedExperts, name)
        monkeypatch.setattr(StackedExperts, name,
                            lambda self, *a, name=name, real=real: taken.append(name) or real(self, *a))
    monkeypatch.setattr(moe, "uses_native_kernel", lambda weight, rows: True)  # as where torch's kernel is fast
    monkeypatch.setattr(moe, "PADDED_MAX_ROWS_PER_PAIR", 10 ** 6)  # always pad (decode-sized batches)
    padded = module(x, ids, weights)
    monkeypatch.setattr(moe, "PADDED_MAX_ROWS_PER_PAIR", 0)  # never pad
    grouped = module(x, ids, weights)
    monkeypatch.setattr(moe, "uses_native_kernel", lambda weight, rows: False)  # as where half precision is upcast
    per_expert = module(x, ids, weights)
    assert taken == ["padded", "_grouped", "per_expert"]
    for out in (padded, grouped, per_expert):
        assert out.dtype == dtype
        assert (out.double() - expected).abs().max().item() <= tolerance * max(scale, 1.0)
    if dtype == torch.float32:
        torch.testing.assert_close(grouped, per_expert, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(padded, per_expert, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_tokens, padded", [(1, False), (8, True), (32, True), (64, True), (65, False)])
def test_padding_is_chosen_for_decode_sized_batches(num_tokens, padded):
    module = experts(num_experts=16, hidden=32, inter=16, dtype=torch.float32)
    ids, _ = routing(num_tokens, 16, 4, torch.float32)
    counts = torch.bincount(ids.reshape(-1), minlength=16)
    most = module.padded_rows(counts, ids.numel())
    assert (most is not None) == padded
    if padded:
        assert most == int(counts.max())


def test_sizes_that_break_the_grouped_gemm_stride_rule_take_the_per_expert_path():
    module = experts(num_experts=4, hidden=12, inter=6, dtype=torch.bfloat16)  # 12 * 2 bytes is not a multiple of 16
    x = torch.randn(7, 12).to(torch.bfloat16)
    ids, weights = routing(7, 4, 2, torch.bfloat16)
    assert not module.grouped_gemm_applies(x, ids.numel())
    expected = reference(module, x, ids, weights)
    assert (module(x, ids, weights).double() - expected).abs().max().item() <= 3e-2 * max(expected.abs().max().item(), 1)
