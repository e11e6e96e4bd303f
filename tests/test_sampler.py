"""The sampler on synthetic logits (greedy, temperature, top-k, top-p, min-p, seeds, reported logprobs),
SamplingParams validation, and seeded sampling through the engine."""

import math

import pytest
import torch

from tandem.errors import ConfigError
from tandem.runtime.sampling.sampler import Sampler, SamplingParams


def params(**kw) -> SamplingParams:
    return SamplingParams.from_dict(kw)


def random_logits(rows=4, vocab=50, seed=0, scale=3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def begun(params_list: list[SamplingParams], keys: list, sampler: Sampler | None = None) -> Sampler:
    """A sampler that has begun each request (empty prompt: the rows' logits stand for its context)."""
    sampler = sampler or Sampler()
    for p, key in zip(params_list, keys):
        sampler.begin(key, p, prompt_len=0)
    return sampler


def step(sampler: Sampler, logits: torch.Tensor, params_list: list[SamplingParams], keys: list) -> list[int]:
    """One decode step as the model runner drives it: sample, then observe the sampled tokens being fed."""
    result = sampler.sample(logits, params_list, keys)
    for key, token in zip(keys, result.tokens):
        sampler.observe(key, [token], sampler.histories[key].length)
    return result.tokens


def draw(logits_row: torch.Tensor, p: SamplingParams, n: int, key="k") -> list[int]:
    """n tokens sampled for one request, one per step (its seeded stream advances with each token)."""
    sampler = begun([p], [key])
    return [step(sampler, logits_row[None], [p], [key])[0] for _ in range(n)]


def test_greedy_is_argmax_and_logprob_is_log_softmax():
    logits = random_logits(rows=6)
    ps = [params(temperature=0)] * 6
    result = begun(ps, list(range(6))).sample(logits, ps, list(range(6)))
    tokens, logprobs = result.tokens, result.logprobs
    assert tokens == logits.argmax(dim=-1).tolist()
    expected = torch.log_softmax(logits, dim=-1).gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
    assert logprobs == pytest.approx(expected.tolist(), abs=1e-6)


def test_reported_logprob_is_of_the_raw_distribution():
    """Temperature/top-k change how a token is chosen, not the logprob reported for it."""
    logits = random_logits(rows=1, seed=3)
    ref = torch.log_softmax(logits[0], dim=-1)
    for temperature in (0.3, 1.0, 2.5):
        p = params(temperature=temperature, top_k=5)
        sampler = begun([p], ["r"])
        for _ in range(5):
            result = sampler.sample(logits, [p], ["r"])
            (token,), (lp,) = result.tokens, result.logprobs
            assert lp == pytest.approx(float(ref[token]), abs=1e-6)


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_k=1, temperature=5.0), dict(top_p=1e-6),
                                dict(top_p=1e-6, temperature=3.0), dict(min_p=1.0), dict(temperature=0, top_k=7)])
def test_filters_that_leave_one_token_equal_greedy(kw):
    logits = random_logits(rows=8, seed=1)
    greedy_params = [params(temperature=0)] * 8
    greedy = begun(greedy_params, list(range(8))).sample(logits, greedy_params, list(range(8))).tokens
    for _trial in range(5):
        ps = [params(**kw)] * 8
        tokens = begun(ps, list(range(8))).sample(logits, ps, list(range(8))).tokens
        assert tokens == greedy, kw


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    logits = torch.zeros(1, 1000)  # uniform: sequences of 20 draws collide with negligible probability
    p = params(temperature=1.0, seed=1234)
    first = draw(logits[0], p, 20)
    assert draw(logits[0], p, 20) == first, "same seed, same sequence"
    assert draw(logits[0], params(temperature=1.0, seed=1235), 20) != first, "another seed, another sequence"
    assert len(set(first)) > 1, "a seeded generator advances between steps"


def test_seeded_request_is_independent_of_batch_neighbours():
    logits = torch.zeros(3, 1000)
    p = params(temperature=1.0, seed=7)
    alone = draw(logits[0], p, 10, key="a")
    batch = [params(temperature=1.0), p, params(temperature=1.0, seed=99)]
    sampler = begun(batch, ["x", "a", "b"])
    together = []
    for _ in range(10):
        tokens = step(sampler, logits, batch, ["x", "a", "b"])
        together.append(tokens[1])
    assert together == alone


def test_release_forgets_the_generator():
    logits = torch.zeros(1, 1000)
    p = params(temperature=1.0, seed=5)
    sampler = begun([p], ["r"])
    first = [step(sampler, logits, [p], ["r"])[0] for _ in range(5)]
    sampler.release("r")
    with pytest.raises(LookupError):
        sampler.sample(logits, [p], ["r"])
    begun([p], ["r"], sampler)
    again = [step(sampler, logits, [p], ["r"])[0] for _ in range(5)]
    assert again == first


def test_temperature_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    n = 4000
    for temperature in (1.0, 0.5):
        probs = torch.softmax(logits[0] / temperature, dim=-1)
        counts = torch.bincount(torch.tensor(draw(logits[0], params(temperature=temperature, seed=0), n)),
                                minlength=4).double()
        for i in range(4):
            sd = math.sqrt(n * probs[i] * (1 - probs[i]))
            assert abs(counts[i] - n * probs[i]) < 5 * sd + 1, (temperature, i, counts.tolist(), probs.tolist())


def test_top_k_keeps_only_the_k_most_likely():
    logits = random_logits(rows=1, vocab=30, seed=2, scale=1.0)
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    seen = set(draw(logits[0], params(temperature=1.0, top_k=3, seed=0), 600))
    assert seen == top3


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])
    logits = torch.log(probs)
    assert set(draw(logits, params(temperature=1.0, top_p=0.65, seed=0), 600)) == {0, 1}
    assert set(draw(logits, params(temperature=1.0, top_p=0.7, seed=0), 600)) <= {0, 1, 2}
    assert set(draw(logits, params(temperature=1.0, top_p=0.75, seed=0), 600)) == {0, 1, 2}
    assert set(draw(logits, params(temperature=1.0, top_p=1.0, seed=0), 3000)) == {0, 1, 2, 3, 4}


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    probs = torch.tensor([0.5, 0.3, 0.12, 0.05, 0.03])
    logits = torch.log(probs)
    # threshold 0.2 * 0.5 = 0.1: tokens 0, 1, 2 survive
    assert set(draw(logits, params(temperature=1.0, min_p=0.2, seed=0), 800)) == {0, 1, 2}
    # threshold 0.7 * 0.5 = 0.35: only the top token
    assert set(draw(logits, params(temperature=1.0, min_p=0.7, seed=0), 200)) == {0}


@pytest.mark.parametrize("kw", [
    dict(max_new_tokens=-1), dict(max_new_tokens=1.5), dict(max_new_tokens="8"), dict(max_new_tokens=True),
    dict(temperature=-0.1), dict(temperature="hot"), dict(temperature=float("nan")),
    dict(top_k=0), dict(top_k=-2), dict(top_k=2.5),
    dict(top_p=0.0), dict(top_p=1.5), dict(top_p=-0.5), dict(top_p=float("nan")),
    dict(min_p=-0.1), dict(min_p=1.1),
    dict(seed=1.5), dict(seed="1"),
    dict(ignore_eos="yes"),
    dict(stop_token_ids=5), dict(stop_token_ids=[1.5]), dict(stop_token_ids=["2"]),
    dict(stop=[""]), dict(stop=[5]), dict(stop=""),
    dict(temprature=0.5),  # unknown key (typo)
])
def test_invalid_params_raise_config_error(kw):
    with pytest.raises(ConfigError):
        SamplingParams.from_dict(kw)


def test_valid_params():
    p = SamplingParams.from_dict(dict(max_new_tokens=0, temperature=0, top_k=-1, top_p=1, min_p=0, seed=3,
                                      ignore_eos=True, stop_token_ids=[1, 2], stop="x"))
    assert p.stop == ["x"] and p.greedy
    assert SamplingParams.from_dict(None) == SamplingParams()


# ---- through the engine --------------------------------------------------------------------------------------

PROMPTS = [[5, 17, 42, 99, 123], [200, 7, 7, 31]]


@pytest.fixture(scope="module")
def engine(ckpt):
    from tandem.engine import Engine

    with Engine(ckpt("llama"), dtype="float32", progress=False) as eng:
        yield eng


def test_engine_seeded_sampling(engine):
    def run(seed):
        p = dict(temperature=1.5, seed=seed, max_new_tokens=12, ignore_eos=True)
        return [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=p)]

    first = run(11)
    assert run(11) == first
    assert run(12) != first


def test_engine_top_k_1_equals_greedy(engine):
    greedy = engine.generate(input_ids=PROMPTS, sampling_params=dict(temperature=0, max_new_tokens=8,
                                                                      ignore_eos=True))
    top1 = engine.generate(input_ids=PROMPTS, sampling_params=dict(temperature=2.0, top_k=1, max_new_tokens=8,
                                                                    ignore_eos=True))
    tiny_p = engine.generate(input_ids=PROMPTS, sampling_params=dict(temperature=2.0, top_p=1e-6,
                                                                      max_new_tokens=8, ignore_eos=True))
    assert [o["output_ids"] for o in top1] == [o["output_ids"] for o in greedy]
    assert [o["output_ids"] for o in tiny_p] == [o["output_ids"] for o in greedy]


def test_engine_rejects_invalid_params(engine):
    with pytest.raises(ConfigError):
        engine.generate(input_ids=PROMPTS, sampling_params=dict(top_p=0))
    with pytest.raises(ConfigError):
        engine.generate(input_ids=PROMPTS, sampling_params=[dict(max_new_tokens=2)])  # one per prompt
    # the engine still works after rejecting a request
    out = engine.generate(input_ids=PROMPTS[0], sampling_params=dict(temperature=0, max_new_tokens=2))
    assert len(out[0]["output_ids"]) == 2
