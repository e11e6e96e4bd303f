"""Hybrid prefix hits through the previous answer, through the engine, for both hybrids (Qwen3.5 dense and
MoE) at pp=1, pp=2 and tp=2: one after another, a request with a 300-token system prompt, a second one with
the same system prompt (the first repeat hits at the 256-token tracking interval), then the first
conversation's second turn (its prompt, its answer and a new message: it resumes after the answer's last
page). Hits are as stated, and tokens and logprobs equal the single-process engine with
`disable_radix_cache=True`, which computes every token."""

import pytest
import torch

from tandem.engine import Engine

SYSTEM, OWN, PAGE, INTERVAL = 300, 40, 16, 256
SAMPLING = {"temperature": 0, "max_new_tokens": 9, "ignore_eos": True}
MODELS = ("qwen3_5", "qwen3_5_moe")
CASES = [pytest.param(kind, tp, pp, id=f"{kind}-tp{tp}-pp{pp}",
                      marks=[pytest.mark.slow] if kind == "qwen3_5_moe" and tp * pp > 1 else [])
         for kind in MODELS for tp, pp in ((1, 1), (1, 2), (2, 1))]


def _prompts() -> tuple[list[int], list[int], list[int]]:
    gen = torch.Generator().manual_seed(300)
    draw = lambda n: torch.randint(3, 300, (n,), generator=gen).tolist()
    system = draw(SYSTEM)
    return system + draw(OWN), system + draw(OWN), draw(6)


def _conversation(engine: Engine) -> list[dict]:
    first, second, message = _prompts()
    turn1 = engine.generate(input_ids=first, sampling_params=SAMPLING, return_logprob=True)[0]
    repeat = engine.generate(input_ids=second, sampling_params=SAMPLING, return_logprob=True)[0]
    turn2 = engine.generate(input_ids=first + turn1["output_ids"] + message, sampling_params=SAMPLING,
                            return_logprob=True)[0]
    return [turn1, repeat, turn2]


_reference: dict = {}


@pytest.mark.parametrize("kind,tp,pp", CASES)
def test_repeats_and_second_turns_hit_with_the_tokens_of_a_run_without_cache(ckpt, kind, tp, pp):
    if kind not in _reference:
        with Engine(ckpt(kind), dtype="float32", progress=False, disable_radix_cache=True) as engine:
            _reference[kind] = _conversation(engine)
    with Engine(ckpt(kind), tp_size=tp, pp_size=pp, dtype="float32", progress=False) as engine:
        got = _conversation(engine)
    answered = SYSTEM + OWN + SAMPLING["max_new_tokens"] - 1  # turn 1's tokens with their state computed
    assert [o["meta_info"]["cached_tokens"] for o in got] == [0, INTERVAL, answered // PAGE * PAGE]
    assert [o["meta_info"]["cached_tokens"] for o in _reference[kind]] == [0, 0, 0]
    for out, expected in zip(got, _reference[kind]):
        assert out["output_ids"] == expected["output_ids"]
        pairs = zip(out["meta_info"]["output_token_logprobs"], expected["meta_info"]["output_token_logprobs"])
        assert max(abs(a - b) for (a, _), (b, _) in pairs) < 1e-4
