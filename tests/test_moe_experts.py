"""`StackedExperts`: the grouped-GEMM path and the per-expert path against a direct per-token float64
computation of sum_k w_k * down_e(silu(gate_e(x)) * up_e(x)), including experts nobody routes to."""

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
def test_grouped_and_per_expert_paths_match_the_reference(monkeypatch, num_tokens, dtype, tolerance):
    module = experts(num_experts=8, hidden=32, inter=16, dtype=dtype)
    x = torch.randn(num_tokens, 32).to(dtype)
    ids, weights = routing(num_tokens, 8, 3, dtype, unused=(2, 5))
    expected = reference(module, x, ids, weights)
    scale = expected.abs().max().item()
    taken = []
    real_grouped, real_per_expert = StackedExperts._grouped, StackedExperts.per_expert
    monkeypatch.setattr(StackedExperts, "_grouped", lambda self, *a: taken.append("grouped") or real_grouped(self, *a))
    monkeypatch.setattr(StackedExperts, "per_expert",
                        lambda self, *a: taken.append("per_expert") or real_per_expert(self, *a))
    monkeypatch.setattr(moe, "uses_native_kernel", lambda weight, rows: True)  # as where torch's kernel is fast
    grouped = module(x, ids, weights)
    monkeypatch.setattr(moe, "uses_native_kernel", lambda weight, rows: False)  # as where half precision is upcast
    per_expert = module(x, ids, weights)
    assert taken == ["grouped", "per_expert"]
    for out in (grouped, per_expert):
        assert out.dtype == dtype
        assert (out.double() - expected).abs().max().item() <= tolerance * max(scale, 1.0)
    if dtype == torch.float32:
        torch.testing.assert_close(grouped, per_expert, rtol=1e-6, atol=1e-6)


def test_sizes_that_break_the_grouped_gemm_stride_rule_take_the_per_expert_path():
    module = experts(num_experts=4, hidden=12, inter=6, dtype=torch.bfloat16)  # 12 * 2 bytes is not a multiple of 16
    x = torch.randn(7, 12).to(torch.bfloat16)
    ids, weights = routing(7, 4, 2, torch.bfloat16)
    assert not module.grouped_gemm_applies(x, ids.numel())
    expected = reference(module, x, ids, weights)
    assert (module(x, ids, weights).double() - expected).abs().max().item() <= 3e-2 * max(expected.abs().max().item(), 1)
