"""The radix prefix cache through the engine, for every architecture: requests sharing a long prefix report
`cached_tokens` covering the shared part (whole pages), and their tokens and logprobs equal a run with the
cache disabled (the single-process engine with `disable_radix_cache=True`). The four requests arrive together:
the later ones wait for the first to cache the shared prefix (for hybrid models, to snapshot its state where
they part), then prefill only their own suffix. Every architecture at pp=1, pp=2 and tp=2."""

import pytest
import torch

from tandem.engine import Engine

SHARED, PAGE = 64, 16
SAMPLING = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}

MODELS = {
    "qwen3_5": ("qwen3_5", {}),
    "qwen3_5_moe_mm": ("qwen3_5_moe", {"multimodal": True}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "llama": ("llama", {}),
}
CASES = [(name, tp, pp) for tp, pp in ((1, 1), (1, 2), (2, 1)) for name in MODELS]  # every architecture


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(64)
    shared = torch.randint(3, 300, (SHARED,), generator=gen).tolist()
    return [shared + [10 + i] + torch.randint(3, 300, (6 + i,), generator=gen).tolist() for i in range(4)]


@pytest.fixture(scope="module")
def without_cache(ckpt):
    """without_cache(name): the single-process run with the cache disabled, once per model in this module."""
    runs: dict[str, list[dict]] = {}

    def get(name: str) -> list[dict]:
        if name not in runs:
            kind, kw = MODELS[name]
            with Engine(ckpt(kind, **kw), dtype="float32", progress=False, disable_radix_cache=True) as engine:
                runs[name] = engine.generate(input_ids=prompts(), sampling_params=SAMPLING, return_logprob=True)
        return runs[name]

    return get


@pytest.mark.parametrize("name,tp,pp", CASES, ids=[f"{c[0]}-tp{c[1]}-pp{c[2]}" for c in CASES])
def test_shared_prefix_is_computed_once_with_the_same_results(ckpt, without_cache, name, tp, pp):
    reference = without_cache(name)
    assert all(o["meta_info"]["cached_tokens"] == 0 for o in reference)
    kind, kw = MODELS[name]
    with Engine(ckpt(kind, **kw), tp_size=tp, pp_size=pp, dtype="float32", progress=False) as engine:
        out = engine.generate(input_ids=prompts(), sampling_params=SAMPLING, return_logprob=True)
        stats = engine.cache_stats()
    assert [o["meta_info"]["cached_tokens"] for o in out] == [0] + [SHARED // PAGE * PAGE] * 3
    assert stats["prefix_cache_hit_tokens"] == 3 * SHARED and stats["prefix_cache_queries"] == 4
    for got, expected in zip(out, reference):
        assert got["output_ids"] == expected["output_ids"]
        got_lp = [lp for lp, _ in got["meta_info"]["output_token_logprobs"]]
        exp_lp = [lp for lp, _ in expected["meta_info"]["output_token_logprobs"]]
        assert max(abs(a - b) for a, b in zip(got_lp, exp_lp)) < 1e-4
