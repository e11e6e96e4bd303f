"""N-gram drafts (vLLM's `ngram` method): hand-computed cases for each part of the rule (longest n-gram first,
latest occurrence, the overlapping copy of a repeating run, the min/max window, the draft budget), the index
grown token by token against a brute-force scan of random sequences, and the settings refused."""

from __future__ import annotations

import random

import pytest

from tandem.errors import ConfigError
from tandem.runtime.scheduling.ngram_draft import NgramDrafter


def draft(tokens, k, lo, hi, max_tokens=None):
    drafter = NgramDrafter(num_speculative_tokens=k, prompt_lookup_min=lo, prompt_lookup_max=hi)
    return drafter.propose(drafter.index(tokens), max_tokens)


CASES = {
    # vLLM's docstring example: [4, 2, 3] has no earlier match, [2, 3] ends at index 2; vLLM stops at the
    # 3 existing tokens, the copy continues with the period 3 it implies
    "vllm example, k=3": ([1, 2, 3, 4, 2, 3], 3, 2, 3, [4, 2, 3]),
    "vllm example, k=4": ([1, 2, 3, 4, 2, 3], 4, 2, 3, [4, 2, 3, 4]),
    # [1, 2, 3] (at 1..3, followed by 8) beats the later [2, 3] (at 5..6, followed by 9): longest first
    "longest n-gram wins": ([7, 1, 2, 3, 8, 2, 3, 9, 1, 2, 3], 2, 1, 3, [8, 2]),
    # [1, 2] occurs at 0..1 (then 5) and 3..4 (then 6): the latest
    "latest occurrence wins": ([1, 2, 5, 1, 2, 6, 1, 2], 2, 2, 2, [6, 1]),
    "no earlier occurrence": ([1, 2, 3, 4], 3, 1, 3, []),
    # only 1-grams match ([5] at index 1), and 1-grams are below the window
    "below prompt_lookup_min": ([4, 5, 9, 5], 3, 2, 3, []),
    # [5] at index 1 is followed by 9, 5, then the copy reads its own first draft: 9
    "copy runs into its own drafts": ([4, 5, 9, 5], 3, 1, 3, [9, 5, 9]),
    "a run of one token": ([3, 3, 3], 4, 1, 2, [3, 3, 3, 3]),
    # [9, 1, 2] (at 0..2, then 5) is longer than prompt_lookup_max = 2: [1, 2] at 5..6 (then 6) ...
    "window capped at prompt_lookup_max": ([9, 1, 2, 5, 8, 1, 2, 6, 9, 1, 2], 1, 2, 2, [6]),
    # ... and within the window when it is 3
    "window up to prompt_lookup_max": ([9, 1, 2, 5, 8, 1, 2, 6, 9, 1, 2], 1, 2, 3, [5]),
    "too short for any n-gram": ([6], 2, 1, 3, []),
    "empty request": ([], 2, 1, 3, []),
}


@pytest.mark.parametrize("tokens, k, lo, hi, expected", CASES.values(), ids=CASES.keys())
def test_hand_computed_drafts(tokens, k, lo, hi, expected):
    assert draft(tokens, k, lo, hi) == expected


def test_max_tokens_limits_the_drafts():
    tokens = [1, 2, 3, 4, 5, 1, 2]
    assert draft(tokens, 4, 1, 2) == [3, 4, 5, 1]
    assert draft(tokens, 4, 1, 2, max_tokens=2) == [3, 4]
    assert draft(tokens, 4, 1, 2, max_tokens=0) == []


def brute_force(tokens, k, lo, hi):
    """Independent reference: scan every earlier end position, longest n first, latest first."""
    length = len(tokens)
    for n in range(min(hi, length), lo - 1, -1):
        suffix = tokens[length - n:]
        for end in range(length - 2, n - 2, -1):
            if tokens[end - n + 1:end + 1] == suffix:
                seq = list(tokens)
                for i in range(k):
                    seq.append(seq[end + 1 + i])
                return seq[length:]
    return []


@pytest.mark.parametrize("seed", range(4))
def test_index_grown_token_by_token_matches_a_brute_force_scan(seed):
    rng = random.Random(seed)
    vocab = rng.choice([2, 3, 5])  # small vocabularies: many matches of every length
    lo = rng.randint(1, 3)
    hi = lo + rng.randint(0, 2)
    drafter = NgramDrafter(num_speculative_tokens=3, prompt_lookup_min=lo, prompt_lookup_max=hi)
    index = drafter.index(rng.randrange(vocab) for _ in range(rng.randint(0, 4)))
    proposals = 0
    for _ in range(60):
        index.extend([rng.randrange(vocab) for _ in range(rng.randint(1, 3))])
        expected = brute_force(index.tokens, 3, lo, hi)
        assert drafter.propose(index) == expected, index.tokens
        proposals += bool(expected)
    assert proposals > 30  # the comparison covered real drafts, not just empty ones


@pytest.mark.parametrize("settings, message", [
    (dict(num_speculative_tokens=0, prompt_lookup_min=1, prompt_lookup_max=2), "num_speculative_tokens"),
    (dict(num_speculative_tokens=2, prompt_lookup_min=0, prompt_lookup_max=2), "prompt_lookup_min"),
    (dict(num_speculative_tokens=2, prompt_lookup_min=3, prompt_lookup_max=2), "prompt_lookup_max"),
    (dict(num_speculative_tokens=2.5, prompt_lookup_min=1, prompt_lookup_max=2), "num_speculative_tokens"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        NgramDrafter(**settings)
