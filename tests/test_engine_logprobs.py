"""Logprobs and sampling options of `Engine.generate`, against transformers on a checkpoint with every weight
randomized: input/output token logprobs and top-N alternatives (SGLang's names) in one process and with the
vocabulary split over two TP ranks, prompt scoring with max_new_tokens 0, one logits computation per step
for all rows that need one, `n` (choice j draws with seed + j) and the penalty / logit_bias names. Also the
grouped prompt-logprob helper the last stage uses."""

from __future__ import annotations

import pytest
import torch

from support.logits import FORCED, HF, bias, forcing_bias, presence_frequency, repetition
from tandem import Engine
from tandem.errors import ConfigError
from tandem.runtime.sampling.logprobs import grouped_token_logprobs, token_logprobs
from tandem.runtime.sampling.params import SamplingParams
from tandem.runtime.scheduling.scheduler import Request

PROMPTS = [[5, 17, 42, 99, 7, 3, 250, 11, 64], [120, 8, 33]]
TOP_N = 3
NEW_TOKENS = 4
TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(ckpt):
    return ckpt("qwen3", with_tokenizer=True)


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoTokenizer

    return HF(model_dir, AutoTokenizer.from_pretrained(str(model_dir)))


@pytest.fixture(scope="module")
def engine(model_dir):
    with Engine(model_dir, dtype="float32", chunked_prefill_size=4, progress=False) as e:
        yield e


def test_grouped_token_logprobs_equal_per_group_and_isolate_failures():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 50, generator=gen) * 3
    targets = torch.randint(0, 50, (9,), generator=gen).tolist()
    sizes, tops = [3, 0, 2, 4], [2, 0, 0, 5]
    groups = grouped_token_logprobs(logits, targets, sizes, tops)
    start = 0
    for group, size, top in zip(groups, sizes, tops):
        alone = token_logprobs(logits[start:start + size], targets[start:start + size], top)
        assert group.error is None and group.logprobs == pytest.approx(alone.logprobs, abs=1e-6)
        assert (group.top_logprobs is None) == (top == 0) == (alone.top_logprobs is None)
        if top:
            assert [[t for t, _ in row] for row in group.top_logprobs] == [[t for t, _ in row] for row in alone.top_logprobs]
        start += size
    logits[4, 7] = float("nan")  # a row of the third group
    groups = grouped_token_logprobs(logits, targets, sizes, tops)
    assert [g.error is not None for g in groups] == [False, False, True, False]
    assert groups[2].logprobs == [] and groups[3].logprobs == pytest.approx(
        token_logprobs(logits[5:], targets[5:]).logprobs, abs=1e-6)
    with pytest.raises(ValueError):
        grouped_token_logprobs(logits, targets, [3, 3], [0, 0])


def check_against_transformers(hf, outs, prompts, num_top: int) -> None:
    for prompt, out in zip(prompts, outs):
        meta = out["meta_info"]
        ids = prompt + out["output_ids"]
        ref = hf.logprobs(ids)
        # input_token_logprobs[k]: prompt token k + 1 (position 0 has nothing before it)
        assert [t for _, t in meta["input_token_logprobs"]] == prompt[1:]
        assert [t for _, t in meta["output_token_logprobs"]] == out["output_ids"]
        rows = [(k, t, lp, top) for k, ((lp, t), top) in
                enumerate(zip(meta["input_token_logprobs"] + meta["output_token_logprobs"],
                              meta["input_top_logprobs"] + meta["output_top_logprobs"]))]
        assert len(rows) == len(ids) - 1
        for k, t, lp, top in rows:
            assert lp == pytest.approx(float(ref[k, t]), abs=TOL)
            expected = torch.topk(ref[k], num_top)
            assert [tok for _, tok in top] == expected.indices.tolist()
            assert [value for value, _ in top] == pytest.approx(expected.values.tolist(), abs=TOL)
        assert out["output_ids"] == hf.greedy(prompt, NEW_TOKENS)


def test_top_logprobs_match_transformers(engine, hf):
    outs = engine.generate(input_ids=PROMPTS, sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS,
                                                               "ignore_eos": True},
                           return_logprob=True, logprob_start_len=0, top_logprobs_num=TOP_N)
    check_against_transformers(hf, outs, PROMPTS, TOP_N)
    # logprob_start_len cuts both lists at the same position; without top_logprobs_num there are none
    later = engine.generate(input_ids=PROMPTS[0], sampling_params={"max_new_tokens": 1}, return_logprob=True,
                            logprob_start_len=5, top_logprobs_num=1)[0]["meta_info"]
    assert [t for _, t in later["input_token_logprobs"]] == PROMPTS[0][5:]
    assert len(later["input_top_logprobs"]) == len(PROMPTS[0]) - 5
    plain = engine.generate(input_ids=PROMPTS[0], sampling_params={"max_new_tokens": 1}, return_logprob=True)[0]
    assert "output_top_logprobs" not in plain["meta_info"] and "input_top_logprobs" not in plain["meta_info"]


def test_top_logprobs_with_the_vocabulary_split_over_tp_ranks(model_dir, hf):
    with Engine(model_dir, tp_size=2, dtype="float32", chunked_prefill_size=4, progress=False) as engine:
        outs = engine.generate(input_ids=PROMPTS, sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS,
                                                                   "ignore_eos": True},
                               return_logprob=True, logprob_start_len=0, top_logprobs_num=TOP_N)
    check_against_transformers(hf, outs, PROMPTS, TOP_N)


def test_max_new_tokens_zero_scores_the_prompt(engine, hf):
    outs = engine.generate(input_ids=PROMPTS, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                           logprob_start_len=0, top_logprobs_num=2)
    for prompt, out in zip(PROMPTS, outs):
        assert out["output_ids"] == [] and out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
        ref = hf.logprobs(prompt)
        got = [lp for lp, _ in out["meta_info"]["input_token_logprobs"]]
        assert got == pytest.approx([float(ref[k, t]) for k, t in enumerate(prompt[1:])], abs=TOL)
        assert out["meta_info"]["output_top_logprobs"] == []
    # without logprobs nothing is computed at all
    assert engine.generate(input_ids=PROMPTS[0], sampling_params={"max_new_tokens": 0})[0]["output_ids"] == []


def test_one_logits_computation_per_step(engine):
    runner = engine.executor.runner
    steps, calls = [], []
    real_execute, real_logits = runner.execute, runner.model.compute_logits

    def execute(step):
        steps.append(step)
        return real_execute(step)

    def compute_logits(hidden):
        calls.append(hidden.shape[0])
        return real_logits(hidden)

    runner.execute, runner.model.compute_logits = execute, compute_logits
    try:
        engine.generate(input_ids=PROMPTS + [PROMPTS[0][:5]], sampling_params={"temperature": 0, "max_new_tokens": 3},
                        return_logprob=True, logprob_start_len=0, top_logprobs_num=2)
    finally:
        del runner.execute, runner.model.compute_logits
    assert len(calls) == len(steps)
    # a step that scores the prompt rows of some requests and samples others still computes logits once
    mixed = [i for i, s in enumerate(steps) if s.input_logprobs and any(s.input_logprobs)
             and any(sampled and not scored for sampled, scored in zip(s.sample, s.input_logprobs))]
    assert mixed, "the batch was meant to mix prompt scoring of some requests with sampling of others"
    for i in mixed:
        scored = sum(span.num_tokens - (1 if nxt is None else 0)
                     for span, wanted, nxt in zip(steps[i].spans, steps[i].input_logprobs, steps[i].next_ids) if wanted)
        assert calls[i] == sum(steps[i].sample) + scored


def test_output_logprobs_only_for_requests_that_ask(engine, hf):
    """Requests without return_logprob get the same tokens with no logprob computed for them; in a batch that
    mixes both, the steps tell the sampler which rows want one and those get transformers' values."""
    params = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    runner = engine.executor.runner
    steps = []
    real_execute = runner.execute

    def execute(step):
        steps.append(step)
        return real_execute(step)

    runner.execute = execute
    try:
        with_logprobs = engine.generate(input_ids=PROMPTS, sampling_params=params, return_logprob=True)
        without = engine.generate(input_ids=PROMPTS, sampling_params=params)
        reqs = [Request(list(p), SamplingParams.from_dict(params), output_logprobs_wanted=want)
                for p, want in zip(PROMPTS, [False, True])]
        engine.run_requests(reqs)
    finally:
        del runner.execute
    assert [o["output_ids"] for o in without] == [o["output_ids"] for o in with_logprobs]
    assert [r.output_ids for r in reqs] == [o["output_ids"] for o in with_logprobs]
    assert all("output_token_logprobs" not in o["meta_info"] for o in without)
    assert reqs[0].output_logprobs == [None] * NEW_TOKENS
    ref = hf.logprobs(PROMPTS[1] + reqs[1].output_ids)
    expected = [float(ref[len(PROMPTS[1]) - 1 + j, t]) for j, t in enumerate(reqs[1].output_ids)]
    assert reqs[1].output_logprobs == pytest.approx(expected, abs=TOL)
    assert [lp for lp, _ in with_logprobs[1]["meta_info"]["output_token_logprobs"]] == pytest.approx(expected, abs=TOL)
    sampling = [s for s in steps if any(s.sample)]
    assert {tuple(s.want_logprobs or ()) for s in sampling} == {(), (False,) * len(PROMPTS), (False, True)}


def test_n_gives_seeded_choices_prompt_by_prompt(engine):
    params = {"temperature": 1.0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True, "seed": 5}
    outs = engine.generate(input_ids=PROMPTS, sampling_params={**params, "n": 3})
    assert len(outs) == 6
    for i, prompt in enumerate(PROMPTS):
        singles = [engine.generate(input_ids=prompt, sampling_params={**params, "seed": 5 + j})[0]["output_ids"]
                   for j in range(3)]
        assert [out["output_ids"] for out in outs[3 * i:3 * i + 3]] == singles
    assert len({tuple(out["output_ids"]) for out in outs}) > 2


def test_penalties_and_logit_bias_by_their_names(engine, hf):
    prompt = PROMPTS[0]
    plain = hf.greedy(prompt, 6)
    forced = {FORCED: forcing_bias(hf, prompt, FORCED, 6)}
    repeated = hf.greedy(prompt, 6, bias(forced))
    with_bias = lambda adjust: lambda row, generated: bias(forced)(adjust(row, generated), generated)
    cases = [  # (sampling params, the adjustment by hand, the output the option must change)
        ({"logit_bias": forced}, bias(forced), plain),
        ({"logit_bias": forced, "frequency_penalty": 2.0}, with_bias(presence_frequency(0.0, 2.0)), repeated),
        ({"logit_bias": forced, "presence_penalty": 1.5}, with_bias(presence_frequency(1.5, 0.0)), repeated),
        ({"repetition_penalty": 1.6}, repetition(1.6, prompt), plain),
    ]
    for options, adjust, unchanged in cases:
        params = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True, **options}
        expected = hf.greedy(prompt, 6, adjust)
        assert expected != unchanged, options
        assert engine.generate(input_ids=prompt, sampling_params=params)[0]["output_ids"] == expected, options


def test_bad_logprob_arguments_raise(engine):
    with pytest.raises(ConfigError, match="top_logprobs_num"):
        engine.generate(input_ids=PROMPTS[0], return_logprob=True, top_logprobs_num=-1)
    with pytest.raises(ConfigError, match="logit_bias"):
        engine.generate(input_ids=PROMPTS[0], sampling_params={"logit_bias": {10**6: 1.0}})
    with pytest.raises(ConfigError, match="^n "):
        engine.generate(input_ids=PROMPTS[0], sampling_params={"n": 0})
