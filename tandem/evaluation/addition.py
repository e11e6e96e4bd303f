"""The bundled default model's task: multi-digit addition written as text ("12+345=" -> "357" then EOS).

One module owns the task so that training (`scripts/train_default_model.py`) and `tandem eval` agree on
it: how problems are drawn, the deterministic held-out set (disjoint from anything training may draw),
the two prompt formats (raw completion and ChatML chat) and the exact-match answer checker.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

MAX_DIGITS = 3  # operands have 1..MAX_DIGITS digits
HELDOUT_SEED = 20240605
HELDOUT_SIZE = 200
MAX_ANSWER_TOKENS = 8  # longest answer is "1998" (4 digits) + EOS; a little slack for wrong outputs

# The two prompt formats the model is trained on and evaluated with.
FORMATS = ("completion", "chat")


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def completion_prompt(self) -> str:
        """Raw form for /v1/completions: "12+345=" (the model continues with "357" and EOS)."""
        return f"{self.a}+{self.b}="

    @property
    def chat_question(self) -> str:
        """User message for /v1/chat/completions: "12+345" (the assistant answers "357")."""
        return f"{self.a}+{self.b}"

    def chat_messages(self) -> list[dict]:
        return [{"role": "user", "content": self.chat_question}]


def sample_operand(rng: random.Random, max_digits: int = MAX_DIGITS) -> int:
    """A number with a uniformly drawn digit count (1..max_digits), uniform within that count."""
    digits = rng.randint(1, max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10 ** digits - 1)


def sample_problem(rng: random.Random, max_digits: int = MAX_DIGITS) -> Problem:
    return Problem(sample_operand(rng, max_digits), sample_operand(rng, max_digits))


def heldout_problems(n: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED) -> list[Problem]:
    """The evaluation set: `n` distinct problems, always the same for the same (n, seed). A problem and
    its mirror (b+a) never both appear, so that excluding both keeps training disjoint from it."""
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    problems: list[Problem] = []
    while len(problems) < n:
        p = sample_problem(rng)
        key = _key(p)
        if key in seen:
            continue
        seen.add(key)
        problems.append(p)
    return problems


def _key(p: Problem) -> tuple[int, int]:
    return (min(p.a, p.b), max(p.a, p.b))


class TrainingSampler:
    """Draws training problems, never one of the held-out problems (nor its mirror b+a)."""

    def __init__(self, seed: int, heldout: list[Problem] | None = None):
        self.rng = random.Random(seed)
        self.excluded = {_key(p) for p in (heldout if heldout is not None else heldout_problems())}

    def __call__(self) -> Problem:
        while True:
            p = sample_problem(self.rng)
            if _key(p) not in self.excluded:
                return p


_LEADING = re.compile(r"^\s*(\d+)")


def extract_answer(text: str) -> str | None:
    """The number the model wrote at the start of its output ("357" from " 357\n"), or None."""
    m = _LEADING.match(text or "")
    return m.group(1) if m else None


def is_correct(text: str, problem: Problem) -> bool:
    """Exact match: the output (EOS already stripped by detokenization), stripped of surrounding
    whitespace, is exactly the decimal sum. "3570" or "357 apples" are wrong."""
    return (text or "").strip() == problem.answer


def parse_problem(prompt: str) -> Problem:
    """Inverse of the prompt formats: "12+345=" or "12 + 345" -> Problem(12, 345)."""
    m = re.fullmatch(r"\s*(\d+)\s*\+\s*(\d+)\s*=?\s*", prompt)
    if not m:
        raise ValueError(f"not an addition problem: {prompt!r}")
    return Problem(int(m.group(1)), int(m.group(2)))
