"""A 6,000-token prompt on a 32k-context checkpoint: the context is the model's own limit (no cap), the prompt
is prefilled in chunks into the paged pool, and the greedy continuation equals transformers' at pp=1 and
pp=2 (the hybrid model: full attention over every page of the prompt, and Gated DeltaNet carried across
chunks)."""

import pytest
import torch

from support.reference import hf_greedy
from tandem.engine import Engine

PROMPT_LEN, NEW_TOKENS, CONTEXT = 6000, 4, 32768


@pytest.fixture(scope="module")
def long_ckpt(ckpt):
    return ckpt("qwen3_5", max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def prompt_and_reference(long_ckpt):
    prompt = torch.randint(3, 300, (PROMPT_LEN,), generator=torch.Generator().manual_seed(6000)).tolist()
    return prompt, hf_greedy(long_ckpt, [prompt], NEW_TOKENS)[0]


@pytest.mark.parametrize("pp", [1, 2])
def test_long_prompt_equals_transformers(long_ckpt, prompt_and_reference, pp):
    prompt, reference = prompt_and_reference
    with Engine(long_ckpt, pp_size=pp, dtype="float32", progress=False, max_total_tokens=8192,
                chunked_prefill_size=1024) as engine:
        assert engine.scheduler.max_len == 8192  # the pool, not a 4096 cap, limits a request here
        assert all(r["context_length"] == CONTEXT for r in engine.stage_report())
        out = engine.generate(input_ids=[prompt], return_logprob=True,
                              sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True})[0]
    assert out["output_ids"] == reference["output_ids"]
    logprobs = [lp for lp, _ in out["meta_info"]["output_token_logprobs"]]
    # fp32 over 6,000 tokens: measured 7.5e-6
    assert max(abs(a - b) for a, b in zip(logprobs, reference["logprobs"])) < 1e-4
