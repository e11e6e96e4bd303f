"""Speculative decoding together with penalties and top-N logprobs: greedy tokens, logprobs and top-N lists
equal the non-speculative run's, with oracle drafts (the plain run's own tokens, some corrupted, so that
runs of every accepted length occur: `use_oracle`). The penalized position i of a verify span must see the
request's history plus the drafts before i only; a history holding every draft (or none) changes the tokens.
The references are checked to differ from the unpenalized run, so the penalties are really exercised."""

from __future__ import annotations

import pytest
import torch

from tandem.engine import Engine
from tests.test_speculative_decoding import GREEDY, SPEC, TOLERANCE, assert_same, plain_run, prompts, use_oracle

# per prompt of `prompts()`; prompt 1 (the unpenalized one) keeps its greedy tokens under these penalties
PENALTIES = [{"presence_penalty": 1.5}, {}, {"frequency_penalty": 1.0},
             {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.6}, {"repetition_penalty": 1.6}]
PENALIZED = [0, 2, 3, 4]
TOP_N = 3


def assert_same_tops(got: list[dict], expected: list[dict], tolerance: float) -> None:
    for g, e in zip(got, expected, strict=True):
        g_tops, e_tops = g["meta_info"]["output_top_logprobs"], e["meta_info"]["output_top_logprobs"]
        assert len(g_tops) == len(e_tops) == len(e["output_ids"])
        for g_top, e_top in zip(g_tops, e_tops):
            assert [t for _, t in g_top] == [t for _, t in e_top]
            assert max(abs(a - b) for (a, _), (b, _) in zip(g_top, e_top)) < tolerance


@pytest.mark.parametrize("kind,layout", [("llama", {}), ("qwen3_5", {"pp_size": 2})], ids=["llama-pp1", "qwen3_5-pp2"])
def test_penalties_and_top_logprobs_equal_the_plain_run(ckpt, kind, layout):
    model_dir = ckpt(kind)
    sampling = [{**GREEDY, **p} for p in PENALTIES]
    plain = plain_run(model_dir, prompts(), GREEDY)
    with Engine(model_dir, dtype="float32", progress=False) as engine:
        reference = engine.generate(input_ids=prompts(), sampling_params=sampling, return_logprob=True,
                                    top_logprobs_num=TOP_N)
    for i in PENALIZED:  # every penalty changes the greedy tokens of its prompt
        assert reference[i]["output_ids"] != plain[i]["output_ids"]
    with Engine(model_dir, dtype="float32", progress=False, **layout, **SPEC) as engine:
        accepted = use_oracle(engine, {tuple(p): r["output_ids"] for p, r in zip(prompts(), reference)})
        got = engine.generate(input_ids=prompts(), sampling_params=sampling, return_logprob=True,
                              top_logprobs_num=TOP_N)
    assert_same(got, reference, TOLERANCE[kind])
    assert_same_tops(got, reference, TOLERANCE[kind])
    assert max(accepted) == SPEC["speculative_num_steps"] and sum(accepted) > len(accepted)


def test_sampled_penalties_with_speculation_keep_top_logprobs_consistent(ckpt):
    """Sampled (seeded) with penalties and top-N: each emitted token's logprob is the one its top-N list
    gives it when it is among them, and a fixed seed with the same drafts repeats exactly."""
    model_dir = ckpt("llama")
    sampling = {"temperature": 0.8, "seed": 5, "max_new_tokens": 16, "ignore_eos": True, "frequency_penalty": 0.7}
    with Engine(model_dir, dtype="float32", progress=False, **SPEC) as engine:
        runs = [engine.generate(input_ids=prompts()[3:], sampling_params=sampling, return_logprob=True,
                                top_logprobs_num=TOP_N) for _ in range(2)]
        assert engine.cache_stats()["spec_verify_passes"] > 0
    assert [r["output_ids"] for r in runs[0]] == [r["output_ids"] for r in runs[1]]
    for result in runs[0]:
        meta = result["meta_info"]
        for (lp, token), top in zip(meta["output_token_logprobs"], meta["output_top_logprobs"], strict=True):
            assert len(top) == TOP_N and torch.tensor([v for v, _ in top]).diff().le(0).all()
            assert all(abs(v - lp) < 1e-5 for v, t in top if t == token)
