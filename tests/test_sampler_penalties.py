"""Penalties and logit_bias in the batched sampler against a hand-written per-request reference on small
vocabularies, and the token history behind them (chunked prefill, re-prefill, rollback)."""

from collections import Counter

import pytest
import torch

from tandem.errors import ConfigError
from tandem.runtime.sampling.penalties import TokenHistory, apply_logit_bias, apply_penalties, apply_verify_penalties
from tandem.runtime.sampling.sampler import Sampler, SamplingParams, draw_seed

VOCAB = 12


def reference_adjusted(logits: list[float], prompt: list[int], output: list[int], p: SamplingParams) -> list[float]:
    """One request's logits after penalties and logit_bias, written out token by token."""
    row = list(logits)
    for token in set(prompt) | set(output):
        if row[token] > 0:
            row[token] = row[token] / p.repetition_penalty
        else:
            row[token] = row[token] * p.repetition_penalty
    for token, count in Counter(output).items():
        row[token] -= p.frequency_penalty * count + p.presence_penalty
    for token, bias in p.logit_bias.items():
        row[token] += bias
    return row


def random_history(generator: torch.Generator, prompt_len: int, output_len: int) -> tuple[list[int], list[int]]:
    # small ids so that tokens repeat within and across prompt and output
    ids = torch.randint(0, VOCAB // 2, (prompt_len + output_len,), generator=generator).tolist()
    return ids[:prompt_len], ids[prompt_len:]


BATCH_PARAMS = [
    dict(temperature=0, frequency_penalty=0.7),
    dict(temperature=0, presence_penalty=-1.3),
    dict(temperature=0, repetition_penalty=1.8),
    dict(temperature=0, repetition_penalty=0.6, frequency_penalty=2.0, presence_penalty=0.4),
    dict(temperature=0),  # no adjustment: a neighbour that must stay untouched
    dict(temperature=0, logit_bias={"3": 5.5, 7: -100}),
    dict(temperature=0, repetition_penalty=1.3, presence_penalty=2.0, logit_bias={1: 2.0, 11: 100}),
    dict(temperature=0, frequency_penalty=-2.0),
]


def make_batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    params = [SamplingParams.from_dict(kw) for kw in BATCH_PARAMS]
    histories = [random_history(generator, prompt_len=int(torch.randint(1, 8, (1,), generator=generator)),
                                output_len=int(torch.randint(0, 9, (1,), generator=generator))) for _ in params]
    logits = torch.randn(len(params), VOCAB, generator=generator) * 3
    return params, histories, logits


def begun_sampler(params, histories, keys) -> Sampler:
    """Prompt fed in chunks of 3, then each generated token fed one step at a time (as the runner does)."""
    sampler = Sampler()
    for p, (prompt, output), key in zip(params, histories, keys):
        sampler.begin(key, p, prompt_len=len(prompt))
        for start in range(0, len(prompt), 3):
            sampler.observe(key, prompt[start:start + 3], start)
        for i, token in enumerate(output):
            sampler.observe(key, [token], len(prompt) + i)
    return sampler


@pytest.mark.parametrize("seed", range(6))
def test_adjusted_logits_equal_the_reference(seed):
    params, histories, logits = make_batch(seed)
    keys = [f"r{i}" for i in range(len(params))]
    sampler = begun_sampler(params, histories, keys)
    adjusted = logits.clone()
    apply_penalties(adjusted, [sampler.histories[k] for k in keys], params)
    assert apply_logit_bias(adjusted, params) == [None] * len(params)
    for row, (p, (prompt, output)) in enumerate(zip(params, histories)):
        expected = reference_adjusted(logits[row].tolist(), prompt, output, p)
        assert adjusted[row].tolist() == pytest.approx(expected, abs=1e-5), (row, BATCH_PARAMS[row])


@pytest.mark.parametrize("seed", range(6))
def test_greedy_tokens_are_the_argmax_of_the_reference(seed):
    params, histories, logits = make_batch(seed)
    keys = [f"r{i}" for i in range(len(params))]
    result = begun_sampler(params, histories, keys).sample(logits, params, keys)
    expected = [max(range(VOCAB), key=lambda t: reference_adjusted(logits[row].tolist(), prompt, output, p)[t])
                for row, (p, (prompt, output)) in enumerate(zip(params, histories))]
    assert result.tokens == expected
    assert result.errors == [None] * len(params)
    # the reported logprob stays that of the raw distribution
    raw = torch.log_softmax(logits, dim=-1)
    assert result.logprobs == pytest.approx([float(raw[r, t]) for r, t in enumerate(expected)], abs=1e-6)


def test_seeded_sampling_draws_from_the_reference_distribution():
    """A seeded draw equals torch.multinomial over softmax(reference / T) with the documented per-draw seed."""
    params, histories, logits = make_batch(11)
    params = [SamplingParams.from_dict({**kw, "temperature": 0.8, "seed": 1000 + i})
              for i, kw in enumerate(BATCH_PARAMS)]
    keys = [f"r{i}" for i in range(len(params))]
    result = begun_sampler(params, histories, keys).sample(logits, params, keys)
    for row, (p, (prompt, output)) in enumerate(zip(params, histories)):
        reference = torch.tensor(reference_adjusted(logits[row].tolist(), prompt, output, p))
        probs = torch.softmax(reference / p.temperature, dim=-1)
        generator = torch.Generator().manual_seed(draw_seed(p.seed, len(output)))
        assert result.tokens[row] == int(torch.multinomial(probs, 1, generator=generator)), row


def test_frequency_penalty_follows_the_distribution():
    """Sampled frequencies match softmax of the penalised logits (5-sigma bounds over 3000 rows)."""
    torch.manual_seed(0)
    rows = 3000
    p = SamplingParams(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.25)
    sampler = Sampler()
    for key in range(rows):
        sampler.begin(key, p, prompt_len=1)
        sampler.observe(key, [2, 0, 0, 0, 1], 0)  # output [0, 0, 0, 1]: token 0 lowered by 1.75, token 1 by 0.75
    tokens = sampler.sample(torch.zeros(rows, 4), [p] * rows, list(range(rows))).tokens
    counts = torch.bincount(torch.tensor(tokens), minlength=4).float()
    expected = torch.softmax(torch.tensor([-1.75, -0.75, 0.0, 0.0]), dim=-1)
    sd = (rows * expected * (1 - expected)).sqrt()
    assert ((counts - rows * expected).abs() < 5 * sd).all(), (counts, expected)


def test_presence_and_frequency_ignore_prompt_tokens_and_repetition_counts_them():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    prompt, output = [1, 2], [3]
    sampler = Sampler()
    cases = {
        "frequency": SamplingParams(temperature=0, frequency_penalty=1.0),
        "presence": SamplingParams(temperature=0, presence_penalty=1.0),
        "repetition": SamplingParams(temperature=0, repetition_penalty=2.0),
    }
    expected = {"frequency": [1.0, 2.0, -1.0, -0.5], "presence": [1.0, 2.0, -1.0, -0.5],
                "repetition": [1.0, 1.0, -2.0, 0.25]}
    for name, p in cases.items():
        sampler.begin(name, p, prompt_len=len(prompt))
        sampler.observe(name, prompt + output, 0)
        adjusted = logits.clone()
        apply_penalties(adjusted, [sampler.histories[name]], [p])
        assert adjusted[0].tolist() == pytest.approx(expected[name]), name


def test_re_prefill_from_prompt_and_output_rebuilds_the_same_state():
    """After preemption or a rank restart the request is fed again from position 0, in other chunks: the
    counts, and so the adjusted logits and the seeded draws, are those of the uninterrupted run."""
    _, histories, logits = make_batch(4)
    params = [SamplingParams.from_dict({**kw, "temperature": 1.3, "seed": -7 - i})
              for i, kw in enumerate(BATCH_PARAMS)]
    keys = [f"r{i}" for i in range(len(params))]
    original = begun_sampler(params, histories, keys)
    restarted = Sampler()
    for p, (prompt, output), key in zip(params, histories, keys):
        restarted.begin(key, p, prompt_len=len(prompt))
        everything = prompt + output
        restarted.observe(key, everything[:5], 0)
        restarted.observe(key, everything[5:], min(5, len(everything)))
    for key in keys:
        h1, h2 = original.histories[key], restarted.histories[key]
        assert h1.length == h2.length and h1.num_generated == h2.num_generated
        assert dict(zip(h1.distinct, h1.output_counts)) == dict(zip(h2.distinct, h2.output_counts))
        assert dict(zip(h1.distinct, h1.total_counts)) == dict(zip(h2.distinct, h2.total_counts))
    assert original.sample(logits, params, keys).tokens == restarted.sample(logits, params, keys).tokens


def test_a_cached_prefix_given_to_begin_counts_like_fed_tokens():
    p = SamplingParams(temperature=0, presence_penalty=1.0, repetition_penalty=1.5)
    everything = [3, 1, 4, 1, 5, 9, 2, 6]
    fed, cached = Sampler(), Sampler()
    fed.begin("r", p, prompt_len=5)
    fed.observe("r", everything, 0)
    cached.begin("r", p, prompt_len=5, prefix_ids=everything[:4])
    cached.observe("r", everything[4:], 4)
    for attribute in ("length", "distinct", "total_counts", "output_counts"):
        assert getattr(fed.histories["r"], attribute) == getattr(cached.histories["r"], attribute), attribute


def test_observe_rollback_replaces_tokens_and_a_gap_is_an_error():
    p = SamplingParams(temperature=0, frequency_penalty=1.0, repetition_penalty=2.0)
    sampler = Sampler()
    sampler.begin("r", p, prompt_len=2)
    sampler.observe("r", [4, 5, 6, 6, 7], 0)
    sampler.observe("r", [8, 8], 3)  # positions 3, 4 replaced: output is now [6, 8, 8]
    history = sampler.histories["r"]
    counts = {t: c for t, c in zip(history.distinct, history.output_counts) if c}
    seen = {t for t, c in zip(history.distinct, history.total_counts) if c}
    assert counts == {6: 1, 8: 2} and seen == {4, 5, 6, 8} and history.num_generated == 3
    with pytest.raises(ValueError, match="gap"):
        sampler.observe("r", [1], 7)


def test_logit_bias_moves_greedy_choices():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]] * 3)
    params = [SamplingParams(temperature=0, logit_bias={1: -100}),
              SamplingParams(temperature=0, logit_bias={0: 100}),
              SamplingParams(temperature=0)]
    sampler = Sampler()
    for i, p in enumerate(params):
        sampler.begin(i, p, prompt_len=1)
    result = sampler.sample(logits, params, [0, 1, 2])
    assert result.tokens == [3, 0, 1]


def test_penalties_come_before_logit_bias():
    """Token 0 (seen, repetition_penalty 2, bias +1): 1.0 / 2 + 1 = 1.5 beats token 1's 1.2; with the bias
    first it would be (1.0 + 1) / 2 = 1.0 and lose."""
    p = SamplingParams(temperature=0, repetition_penalty=2.0, logit_bias={0: 1.0})
    sampler = Sampler()
    sampler.begin("r", p, prompt_len=2)
    sampler.observe("r", [0, 2], 0)
    assert sampler.sample(torch.tensor([[1.0, 1.2, -3.0]]), [p], ["r"]).tokens == [0]


def test_logit_bias_outside_the_vocabulary_fails_that_row_only():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, logit_bias={VOCAB: 1.0}),
              SamplingParams(temperature=0, logit_bias={2: 50})]
    sampler = Sampler()
    for i, p in enumerate(params):
        sampler.begin(i, p, prompt_len=1)
    result = sampler.sample(logits, params, [0, 1, 2])
    assert result.tokens[0] == int(logits[0].argmax()) and result.tokens[2] == 2
    assert result.tokens[1] is None and result.logprobs[1] is None
    assert "logit_bias" in result.errors[1] and str(VOCAB) in result.errors[1]
    assert result.errors[0] is None and result.errors[2] is None
    with pytest.raises(ConfigError, match="^logit_bias"):
        params[1].validate_vocab(VOCAB)
    params[2].validate_vocab(VOCAB)


def test_history_is_required_and_must_count_for_penalties():
    logits = torch.zeros(1, VOCAB)
    sampler = Sampler()
    with pytest.raises(LookupError, match="begin"):
        sampler.sample(logits, [SamplingParams()], ["unknown"])
    sampler.begin("plain", SamplingParams(), prompt_len=1)
    with pytest.raises(ValueError, match="penalties"):
        sampler.sample(logits, [SamplingParams(presence_penalty=1.0)], ["plain"])


@pytest.mark.parametrize("seed", range(4))
def test_verify_rows_are_penalized_with_the_drafts_before_them_only(seed):
    """Speculative decoding: a history that observed a verify span (last token + k drafts, some new tokens,
    some repeated); row r of the span equals the reference over the history less drafts[r:]."""
    generator = torch.Generator().manual_seed(seed)
    params = [SamplingParams.from_dict(kw) for kw in BATCH_PARAMS if "logit_bias" not in kw]
    spans, histories, drafts = [], [], []
    for p in params:
        prompt, output = random_history(generator, prompt_len=int(torch.randint(1, 6, (1,), generator=generator)),
                                        output_len=int(torch.randint(1, 5, (1,), generator=generator)))
        span_drafts = torch.randint(0, VOCAB, (int(torch.randint(0, 4, (1,), generator=generator)),),
                                    generator=generator).tolist()
        history = TokenHistory(len(prompt), count_tokens=p.uses_penalties)
        history.observe(prompt + output + span_drafts, 0)
        spans.append((prompt, output))
        histories.append(history)
        drafts.append(span_drafts)
    logits = torch.randn(sum(len(d) + 1 for d in drafts), VOCAB, generator=generator) * 3
    adjusted = logits.clone()
    apply_verify_penalties(adjusted, histories, params, drafts)
    row = 0
    for p, (prompt, output), span_drafts in zip(params, spans, drafts):
        for r in range(len(span_drafts) + 1):
            expected = reference_adjusted(logits[row].tolist(), prompt, output + span_drafts[:r], p)
            torch.testing.assert_close(adjusted[row], torch.tensor(expected))
            row += 1
