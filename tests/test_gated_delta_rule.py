"""Tests for tandem.layers.gated_delta_rule against transformers' reference Qwen3.5 kernels."""

import inspect

import pytest
import torch
import torch.nn.functional as F
import transformers.models.qwen3_5.modeling_qwen3_5 as qwen3_5

from tandem.layers.gated_delta_rule import (
    causal_conv1d_decode,
    causal_conv1d_prefill,
    causal_conv1d_tokens,
    chunk_gated_delta_rule,
    recurrent_gated_delta_rule_step,
    recurrent_gated_delta_rule_tokens,
)

# The transformers functions are wrapped by a hub-kernel / FLA dispatcher; unwrap to the pure-torch code.
hf_chunk = inspect.unwrap(qwen3_5.torch_chunk_gated_delta_rule)
hf_recurrent = inspect.unwrap(qwen3_5.torch_recurrent_gated_delta_rule)

H, DK, DV = 4, 16, 32
TOL = dict(atol=1e-5, rtol=1e-5)


def make_inputs(num_tokens, seed=0, dtype=torch.float32, batch=()):
    gen = torch.Generator().manual_seed(seed)
    shape = (*batch, num_tokens, H)
    q = torch.randn(*shape, DK, generator=gen).to(dtype)
    k = torch.randn(*shape, DK, generator=gen).to(dtype)
    v = torch.randn(*shape, DV, generator=gen).to(dtype)
    g = -F.softplus(torch.randn(*shape, generator=gen) - 1.0).to(dtype)  # log-decay <= 0
    beta = torch.sigmoid(torch.randn(*shape, generator=gen)).to(dtype)
    state = 0.5 * torch.randn(*batch, H, DK, DV, generator=gen)
    return q, k, v, g, beta, state


def hf_reference(fn, q, k, v, g, beta, state, **kwargs):
    """transformers layout: q/k/v [B, T, H, D], g/beta [B, T, H], state [B, H, Dk, Dv]."""
    out, final = fn(
        q[None], k[None], v[None], g[None], beta[None],
        initial_state=state[None], output_final_state=True, use_qk_l2norm_in_kernel=True, **kwargs,
    )
    return out[0], final[0]


@pytest.mark.parametrize("num_tokens", [1, 7, 64, 150])
def test_chunk_matches_transformers(num_tokens):
    q, k, v, g, beta, state = make_inputs(num_tokens, seed=num_tokens)
    state_before = state.clone()
    out, final = chunk_gated_delta_rule(q, k, v, g, beta, state)
    assert out.shape == (num_tokens, H, DV) and out.dtype == torch.float32
    assert final.shape == (H, DK, DV) and final.dtype == torch.float32
    assert torch.equal(state, state_before), "initial_state must not be modified"

    ref_out, ref_final = hf_reference(hf_chunk, q, k, v, g, beta, state, chunk_size=64)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(final, ref_final, **TOL)

    ref_out, ref_final = hf_reference(hf_recurrent, q, k, v, g, beta, state)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(final, ref_final, **TOL)


def test_chunk_size_does_not_matter():
    q, k, v, g, beta, state = make_inputs(100, seed=3)
    out64, final64 = chunk_gated_delta_rule(q, k, v, g, beta, state, chunk_size=64)
    out16, final16 = chunk_gated_delta_rule(q, k, v, g, beta, state, chunk_size=16)
    torch.testing.assert_close(out16, out64, **TOL)
    torch.testing.assert_close(final16, final64, **TOL)


def test_without_l2norm_matches_step():
    q, k, v, g, beta, state = make_inputs(20, seed=5)
    k = 0.2 * k  # keep |k| small so the un-normalised delta rule stays stable
    out, final = chunk_gated_delta_rule(q, k, v, g, beta, state, chunk_size=8, use_qk_l2norm=False)
    step_state = state[None].clone()
    for t in range(20):
        o = recurrent_gated_delta_rule_step(
            q[t : t + 1], k[t : t + 1], v[t : t + 1], g[t : t + 1], beta[t : t + 1], step_state,
            use_qk_l2norm=False,
        )
        torch.testing.assert_close(o[0], out[t], **TOL)
    torch.testing.assert_close(step_state[0], final, **TOL)


def test_prefill_chunks_then_decode_equals_single_prefill():
    """Two sequences: prefill 40, prefill 30 more from the carried state, then decode 10 tokens batched."""
    total, first, second = 80, 40, 30
    seqs = [make_inputs(total, seed=10 + i) for i in range(2)]
    states, outs = [], []
    for q, k, v, g, beta, state in seqs:
        out_a, s = chunk_gated_delta_rule(q[:first], k[:first], v[:first], g[:first], beta[:first], state)
        sl = slice(first, first + second)
        out_b, s = chunk_gated_delta_rule(q[sl], k[sl], v[sl], g[sl], beta[sl], s)
        states.append(s)
        outs.append([out_a, out_b])

    batch_state = torch.stack(states)  # [B, H, Dk, Dv]
    for t in range(first + second, total):
        step_in = [torch.stack([seq[i][t] for seq in seqs]) for i in range(5)]  # each [B, H, ...]
        out_t = recurrent_gated_delta_rule_step(*step_in, batch_state)
        for b in range(2):
            outs[b].append(out_t[b : b + 1])

    for b, (q, k, v, g, beta, state) in enumerate(seqs):
        ref_out, ref_final = chunk_gated_delta_rule(q, k, v, g, beta, state)
        torch.testing.assert_close(torch.cat(outs[b]), ref_out, **TOL)
        torch.testing.assert_close(batch_state[b], ref_final, **TOL)


def test_low_precision_inputs_keep_fp32_state():
    q, k, v, g, beta, state = make_inputs(30, seed=7, dtype=torch.bfloat16)
    out, final = chunk_gated_delta_rule(q, k, v, g, beta, state)
    assert out.dtype == torch.bfloat16 and final.dtype == torch.float32
    ref_out, ref_final = chunk_gated_delta_rule(q.float(), k.float(), v.float(), g.float(), beta.float(), state)
    torch.testing.assert_close(final, ref_final, **TOL)  # inputs upcast exactly, maths in fp32
    torch.testing.assert_close(out, ref_out.to(torch.bfloat16))

    step_state = final[None].clone()
    step_out = recurrent_gated_delta_rule_step(q[:1], k[:1], v[:1], g[:1], beta[:1], step_state)
    assert step_out.dtype == torch.bfloat16 and step_state.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# causal conv1d
# --------------------------------------------------------------------------------------------------

C, K = 12, 4


def conv_reference(x, weight, bias):
    """Whole-sequence causal depthwise conv + SiLU, x: [T, C] -> [T, C]."""
    y = F.conv1d(x.t()[None], weight[:, None, :], bias, padding=K - 1, groups=C)[0, :, : x.shape[0]]
    return F.silu(y).t()


@pytest.mark.parametrize("use_bias", [True, False])
def test_conv_prefill_matches_reference(use_bias):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, C, generator=gen)
    weight = torch.randn(C, K, generator=gen)
    bias = torch.randn(C, generator=gen) if use_bias else None
    y, new_state = causal_conv1d_prefill(x, weight, bias, torch.zeros(K - 1, C))
    torch.testing.assert_close(y, conv_reference(x, weight, bias), **TOL)
    torch.testing.assert_close(new_state, x[-(K - 1) :])


def test_conv_chunked_prefill_and_decode():
    gen = torch.Generator().manual_seed(2)
    total, num_seqs = 26, 2
    xs = torch.randn(num_seqs, total, C, generator=gen)
    weight = torch.randn(C, K, generator=gen)
    bias = torch.randn(C, generator=gen)
    chunks = [5, 2, 1, 3, 9]  # includes chunks shorter than K-1 = 3
    prefill_len = sum(chunks)

    states, ys = [], []
    for x in xs:
        state, pos, parts = torch.zeros(K - 1, C), 0, []
        for n in chunks:
            y, state = causal_conv1d_prefill(x[pos : pos + n], weight, bias, state)
            assert y.shape == (n, C) and state.shape == (K - 1, C)
            parts.append(y)
            pos += n
        states.append(state)
        ys.append(parts)

    batch_state = torch.stack(states)  # [B, K-1, C]
    for t in range(prefill_len, total):
        y_t = causal_conv1d_decode(xs[:, t], weight, bias, batch_state)
        assert y_t.shape == (num_seqs, C)
        for b in range(num_seqs):
            ys[b].append(y_t[b : b + 1])

    for b in range(num_seqs):
        torch.testing.assert_close(torch.cat(ys[b]), conv_reference(xs[b], weight, bias), **TOL)
        torch.testing.assert_close(batch_state[b], xs[b, -(K - 1) :])


def test_conv_dtypes():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, C, generator=gen).to(torch.bfloat16)
    weight = torch.randn(C, K, generator=gen).to(torch.bfloat16)
    state = torch.zeros(K - 1, C, dtype=torch.bfloat16)
    y, new_state = causal_conv1d_prefill(x, weight, None, state)
    assert y.dtype == torch.bfloat16 and new_state.dtype == torch.bfloat16
    ref = conv_reference(x.float(), weight.float(), None)
    torch.testing.assert_close(y, ref.to(torch.bfloat16))
    decode_state = new_state[None].clone()
    y_dec = causal_conv1d_decode(x[:1], weight, None, decode_state)
    assert y_dec.dtype == torch.bfloat16 and decode_state.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tokens_kernels_equal_that_many_decode_steps(dtype):
    """The verify kernels (n tokens per sequence at once) against n decode steps on the same states: the rule's
    outputs and states bit for bit (same float32 operations per token), the conv within one rounding of silu
    (its vectorized tail may differ), its state exactly."""
    batch, n = 3, 4
    q, k, v, g, beta, state = make_inputs(n, seed=11, dtype=dtype, batch=(batch,))
    stepped = state.clone()
    expected = torch.stack([recurrent_gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], stepped)
                            for t in range(n)], dim=1)
    at_once = state.clone()
    out = recurrent_gated_delta_rule_tokens(q, k, v, g, beta, at_once)
    assert out.shape == (batch, n, H, DV) and out.dtype == dtype
    assert torch.equal(out, expected) and torch.equal(at_once, stepped)
    assert not torch.equal(at_once, state)

    gen = torch.Generator().manual_seed(12)
    x = torch.randn(batch, n, C, generator=gen).to(dtype)
    weight = torch.randn(C, K, generator=gen).to(dtype)
    conv = torch.randn(batch, K - 1, C, generator=gen).to(dtype)
    conv_stepped = conv.clone()
    expected = torch.stack([causal_conv1d_decode(x[:, t], weight, None, conv_stepped) for t in range(n)], dim=1)
    conv_at_once = conv.clone()
    y = causal_conv1d_tokens(x, weight, None, conv_at_once)
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(conv_at_once, conv_stepped) and torch.equal(conv_at_once, x[:, -(K - 1):])
