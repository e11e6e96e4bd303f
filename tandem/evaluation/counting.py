"""The bundled default model's long-answer task: counting a range ("17..31=" -> "17 18 19 ... 31" then EOS).

Its answers are 9 to 39 tokens long and fully determined by the prompt, which makes it the workload where the
model's multi-token-prediction head (speculative decoding, NEXTN) has something to predict. One module owns
it, as `addition` owns the addition task: how problems are drawn (training and `tandem eval` agree on it), the
deterministic held-out set (disjoint from anything training may draw) and the exact-match checker."""

from __future__ import annotations

import random
from dataclasses import dataclass

HELDOUT_SEED = 20261202
HELDOUT_SIZE = 100
MIN_COUNT, MAX_COUNT = 5, 10  # numbers in an answer
LARGEST = 999
MAX_ANSWER_TOKENS = 48  # 10 numbers of up to 3 digits, 9 spaces, EOS: 40, with slack for wrong outputs


@dataclass(frozen=True)
class CountProblem:
    start: int
    end: int  # inclusive

    @property
    def answer(self) -> str:
        return " ".join(str(n) for n in range(self.start, self.end + 1))

    @property
    def completion_prompt(self) -> str:
        """Raw form for /v1/completions: "17..31=" (the model continues with "17 18 ... 31" and EOS)."""
        return f"{self.start}..{self.end}="

    @property
    def chat_question(self) -> str:
        return f"{self.start}..{self.end}"

    def chat_messages(self) -> list[dict]:
        return [{"role": "user", "content": self.chat_question}]


def sample_count_problem(rng: random.Random) -> CountProblem:
    """A start with a uniformly drawn digit count (1..3), uniform within it, and 5..10 numbers (never past 999)."""
    digits = rng.randint(1, 3)
    start = rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)
    start = min(start, LARGEST - MIN_COUNT + 1)
    count = rng.randint(MIN_COUNT, min(MAX_COUNT, LARGEST - start + 1))
    return CountProblem(start, start + count - 1)


def heldout_count_problems(n: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED) -> list[CountProblem]:
    """The evaluation set: `n` distinct problems, always the same for the same (n, seed)."""
    rng = random.Random(seed)
    seen: set[CountProblem] = set()
    problems: list[CountProblem] = []
    while len(problems) < n:
        p = sample_count_problem(rng)
        if p not in seen:
            seen.add(p)
            problems.append(p)
    return problems


class CountTrainingSampler:
    """Draws training problems, never a held-out one."""

    def __init__(self, seed: int, heldout: list[CountProblem] | None = None):
        self.rng = random.Random(seed)
        self.excluded = set(heldout if heldout is not None else heldout_count_problems())

    def __call__(self) -> CountProblem:
        while True:
            p = sample_count_problem(self.rng)
            if p not in self.excluded:
                return p


def is_count_correct(text: str, problem: CountProblem) -> bool:
    """Exact match of the output (EOS stripped, surrounding whitespace ignored) with the range written out."""
    return (text or "").strip() == problem.answer
