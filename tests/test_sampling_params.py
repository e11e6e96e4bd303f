"""SamplingParams validation and normalisation: non-finite and out-of-range values name their field,
near-zero temperatures become greedy, seeds of any size map deterministically into [0, 2**63)."""

import hashlib

import pytest
import torch

from tandem.errors import ConfigError
from tandem.runtime.sampling.params import normalize_seed
from tandem.runtime.sampling.sampler import Sampler, SamplingParams

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field,value", [
    ("temperature", NAN), ("temperature", INF), ("temperature", -INF), ("temperature", 10 ** 400),
    ("temperature", -1e-9),
    ("top_p", NAN), ("top_p", INF), ("top_p", 0.0), ("top_p", 1.0000001),
    ("min_p", NAN), ("min_p", -INF), ("min_p", -0.01), ("min_p", 1.01),
    ("top_k", 0), ("top_k", -5), ("top_k", 3.0), ("top_k", True),
    ("presence_penalty", NAN), ("presence_penalty", INF), ("presence_penalty", 2.01), ("presence_penalty", -2.5),
    ("presence_penalty", "1"),
    ("frequency_penalty", NAN), ("frequency_penalty", -INF), ("frequency_penalty", 3), ("frequency_penalty", -2.001),
    ("repetition_penalty", NAN), ("repetition_penalty", INF), ("repetition_penalty", 0), ("repetition_penalty", -1.0),
    ("repetition_penalty", None),
    ("logit_bias", {5: NAN}), ("logit_bias", {5: INF}), ("logit_bias", {5: 100.5}), ("logit_bias", {5: -101}),
    ("logit_bias", {-1: 1.0}), ("logit_bias", {"x": 1.0}), ("logit_bias", {"-3": 1.0}), ("logit_bias", {1.5: 1.0}),
    ("logit_bias", {5: "1"}), ("logit_bias", [1, 2]),
    ("seed", 1.0), ("seed", "7"), ("seed", NAN), ("seed", True),
    ("max_new_tokens", -1), ("max_new_tokens", 2 ** 63),
    ("stop_token_ids", [-1]), ("stop_token_ids", [2 ** 64]), ("logit_bias", {2 ** 63: 1.0}),
    ("logit_bias", {"9" * 5000: 1.0}),
])
def test_invalid_values_name_their_field(field, value):
    with pytest.raises(ConfigError) as info:
        SamplingParams.from_dict({field: value})
    assert str(info.value).split(" ", 1)[0] == field, str(info.value)
    with pytest.raises(ConfigError):  # direct construction validates too
        SamplingParams(**{field: value})


@pytest.mark.parametrize("temperature", [1e-39, 5e-324, 0.0, 9.99e-6])
def test_tiny_temperature_is_greedy(temperature):
    p = SamplingParams(temperature=temperature, seed=3)
    assert p.temperature == 0.0 and p.greedy
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 50
    sampler = Sampler()
    for key in range(4):
        sampler.begin(key, p, prompt_len=1)
    result = sampler.sample(logits, [p] * 4, list(range(4)))
    assert result.tokens == logits.argmax(dim=-1).tolist() and result.errors == [None] * 4


def test_temperature_at_the_threshold_samples():
    p = SamplingParams(temperature=1e-5)
    assert p.temperature == 1e-5 and not p.greedy


def test_valid_values_are_normalised():
    p = SamplingParams.from_dict(dict(temperature=1, top_p=1, min_p=0, presence_penalty=-2, frequency_penalty=2,
                                      repetition_penalty=1, logit_bias={"50256": -100, 7: 100, "0": 0}))
    assert p.logit_bias == {50256: -100.0, 7: 100.0, 0: 0.0}
    assert all(isinstance(v, float) for v in (p.temperature, p.top_p, p.min_p, p.presence_penalty,
                                              p.frequency_penalty, p.repetition_penalty))
    assert p.uses_penalties and not SamplingParams(repetition_penalty=1.0, logit_bias={1: 5}).uses_penalties
    assert SamplingParams.from_dict({"logit_bias": None}).logit_bias == {}
    assert SamplingParams(**vars(p)) == p, "normalisation is idempotent"


@pytest.mark.parametrize("seed", [0, 1, 1234, 2 ** 63 - 1])
def test_seeds_in_range_are_kept(seed):
    assert SamplingParams(seed=seed).seed == seed


@pytest.mark.parametrize("seed", [-1, -2 ** 63, 2 ** 63, 2 ** 64, 2 ** 64 + 5, 10 ** 100, -(10 ** 300)])
def test_other_seeds_are_hashed_into_range(seed):
    digest = hashlib.sha256(b"tandem-seed:" + str(seed).encode()).digest()
    expected = int.from_bytes(digest[:8], "big") >> 1
    assert normalize_seed(seed) == expected and 0 <= expected < 2 ** 63
    assert SamplingParams(seed=seed).seed == expected
    assert SamplingParams(seed=expected).seed == expected, "a normalised seed stays as it is"


def stream(seed: int, steps: int = 12) -> list[int]:
    """Tokens of one seeded request over `steps` decode steps on uniform logits."""
    p = SamplingParams(temperature=1.0, seed=seed)
    sampler = Sampler()
    sampler.begin("r", p, prompt_len=1)
    sampler.observe("r", [0], 0)
    tokens = []
    for position in range(1, steps + 1):
        tokens.append(sampler.sample(torch.zeros(1, 1000), [p], ["r"]).tokens[0])
        sampler.observe("r", tokens[-1:], position)
    return tokens


def test_huge_and_negative_seeds_give_reproducible_distinct_streams():
    seeds = [2 ** 200, -5, -(2 ** 100), 2 ** 64, 5]
    streams = {seed: stream(seed) for seed in seeds}
    for seed in seeds:
        assert stream(seed) == streams[seed], seed
    assert len({tuple(s) for s in streams.values()}) == len(seeds), "different seeds, different streams"


def test_extreme_valid_values_fit_the_step_messages():
    """Whatever validates can travel to the ranks: every integer fits the wire's 64 bits."""
    import msgspec

    from tandem.layers.span import Span
    from tandem.runtime.step import StepInput

    p = SamplingParams(top_k=2 ** 70, seed=-(2 ** 200), max_new_tokens=2 ** 63 - 1, stop_token_ids=[0, 2 ** 63 - 1],
                       logit_bias={2 ** 63 - 1: 1.0, "0": -1.0}, temperature=1e308)
    assert p.top_k == -1  # more than any vocabulary: off
    step = StepInput([Span(0, 0, 1)], [5], [True], [p], [1])
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(step), type=StepInput).params[0] == p
