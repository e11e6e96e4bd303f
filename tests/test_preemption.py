"""Preemption through the engine: a KV pool of 160 tokens serves 40 requests that need 8x that. Admission is
optimistic, so decode runs out of pages; the newest requests are retracted and later resume by prefilling
their prompt and the tokens generated so far. Every request finishes with the tokens (and, within fp32
rounding, the logprobs) of an engine whose pool holds them all at once, and the preemptions are counted."""

import pytest
import torch

from tandem.engine import Engine

SAMPLING = {"temperature": 0, "max_new_tokens": 22, "ignore_eos": True}


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(40)
    return [torch.randint(3, 300, (10,), generator=gen).tolist() for _ in range(40)]  # 40 x (10 + 22) = 1280


# A resumed request's next token comes from a prefill instead of a decode step, so its logprob differs by fp32
# rounding: measured up to 2e-5 for llama; for Qwen3.5 the prefill runs the chunked gated delta rule where
# decode runs the recurrent one (see test_decode_equals_prefill), measured up to 2.7e-4 with MoE at pp=2.
# A wrong page or state moves logprobs by 1e-2 or more (and changes tokens).
TOLERANCE = {"llama": 1e-4, "qwen3_5": 1e-3, "qwen3_5_moe": 1e-3}


@pytest.mark.parametrize("kind,kw,pp", [("llama", {}, 1), ("qwen3_5", {}, 1), ("qwen3_5_moe", {"multimodal": True}, 2)],
                         ids=["llama-pp1", "qwen3_5-pp1", "qwen3_5_moe_mm-pp2"])
def test_small_pool_preempts_and_matches_an_unconstrained_run(ckpt, kind, kw, pp):
    model_dir = ckpt(kind, **kw)
    with Engine(model_dir, dtype="float32", progress=False, max_total_tokens=2048) as engine:
        roomy = engine.generate(input_ids=prompts(), sampling_params=SAMPLING, return_logprob=True)
        assert engine.cache_stats()["preemptions"] == 0
    with Engine(model_dir, pp_size=pp, dtype="float32", progress=False, max_total_tokens=160, page_size=4) as engine:
        small = engine.generate(input_ids=prompts(), sampling_params=SAMPLING, return_logprob=True)
        stats = engine.cache_stats()
    assert stats["max_total_tokens"] == 160 and stats["preemptions"] > 0
    for got, expected in zip(small, roomy):
        assert got["meta_info"]["finish_reason"] == {"type": "length", "length": 22}
        assert got["output_ids"] == expected["output_ids"]
        got_lp = [lp for lp, _ in got["meta_info"]["output_token_logprobs"]]
        exp_lp = [lp for lp, _ in expected["meta_info"]["output_token_logprobs"]]
        assert max(abs(a - b) for a, b in zip(got_lp, exp_lp)) < TOLERANCE[kind]
