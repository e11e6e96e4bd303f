"""`SamplingParams`: one request's sampling options (SGLang / OpenAI names), validated and normalised.

Construction validates (so an invalid `SamplingParams` cannot reach a rank) and normalises in place:
- a temperature below `GREEDY_TEMPERATURE` (1e-5) becomes 0, i.e. greedy, as vLLM and SGLang do;
- numbers become floats, `logit_bias` keys become ints (JSON sends them as strings);
- the seed becomes `normalize_seed(seed)`, a value in [0, 2**63) that fits any 64-bit wire format;
- a top_k of `MAX_TOKEN_ID` or more (more than any vocabulary) becomes -1 (off).
Every other integer (max_new_tokens, stop_token_ids, logit_bias keys) must lie in [0, 2**63): no larger value
means anything, and every value must fit the 64-bit integers of the step messages sent to the ranks.

`n` > 1 asks for several completions of one prompt: each is its own request with `for_choice(j)`'s params
(choice j of a seeded request draws with seed + j, so the choices differ and each is reproducible).

`json_schema`, `regex` and `ebnf` (at most one) constrain the output to a grammar; the driver compiles it
and sends each step a token mask (see `tandem.runtime.constraints`). Here they are only checked to be strings.

Every `ConfigError` message starts with the name of the field it is about."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, fields, replace

from tandem.errors import ConfigError

GREEDY_TEMPERATURE = 1e-5
SEED_RANGE = 2 ** 63
INT_RANGE = 2 ** 63  # integers sent to the ranks are int64
MAX_TOKEN_ID = 2 ** 31  # no vocabulary comes near it
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty / frequency_penalty: [-2, 2]
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]
MAX_N = 128  # OpenAI's limit on completions per prompt
CONSTRAINT_FIELDS = ("json_schema", "regex", "ebnf")


def normalize_seed(seed: int) -> int:
    """Any integer -> [0, 2**63). Seeds already in range map to themselves; any other integer maps to the
    first 8 bytes of SHA-256 of its decimal text (big-endian), shifted right by one bit. Deterministic across
    processes, platforms and Python versions; the same seed always gives the same stream."""
    if 0 <= seed < SEED_RANGE:
        return seed
    digest = hashlib.sha256(b"tandem-seed:" + str(seed).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_float(name: str, value) -> float:
    """`value` as a finite float, or a ConfigError naming `name`."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return number


def _token_id(value) -> int | None:
    """A logit_bias key as a token id: an int or a decimal string (JSON object keys), else None."""
    if _is_int(value):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value) if len(value) <= 30 else INT_RANGE  # (int() refuses thousands of digits)
    return None


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0  # OpenAI: minus this for each token generated at least once
    frequency_penalty: float = 0.0  # OpenAI: minus this times the number of times a token was generated
    repetition_penalty: float = 1.0  # SGLang/HF: divides positive / multiplies negative logits of seen tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    n: int = 1  # completions per prompt (expanded into n requests before scheduling; see for_choice)
    # structured output (SGLang's names; at most one): a JSON schema (JSON text), a regular expression, or an
    # EBNF grammar in xgrammar's dialect; applied from the first token, or only after the first occurrence of
    # constraint_after_token_id in the output (e.g. after a reasoning parser's `</think>`)
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    constraint_after_token_id: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, values: dict | None) -> SamplingParams:
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown sampling parameter(s) {unknown}; expected some of {sorted(known)}")
        if isinstance(values.get("stop"), str):
            values["stop"] = [values["stop"]]
        if values.get("logit_bias", {}) is None:
            values["logit_bias"] = {}
        return cls(**values)

    def validate(self) -> None:
        """Check every field and normalise temperature, seed, numbers and logit_bias keys in place."""
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        check(_is_int(self.max_new_tokens) and 0 <= self.max_new_tokens < INT_RANGE,
              f"max_new_tokens must be a non-negative integer below 2**63, got {self.max_new_tokens!r}")
        self.temperature = _finite_float("temperature", self.temperature)
        check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature!r}")
        if self.temperature < GREEDY_TEMPERATURE:
            self.temperature = 0.0
        check(_is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1),
              f"top_k must be -1 (off) or a positive integer, got {self.top_k!r}")
        if self.top_k >= MAX_TOKEN_ID:
            self.top_k = -1
        self.top_p = _finite_float("top_p", self.top_p)
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        self.min_p = _finite_float("min_p", self.min_p)
        check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        check(self.seed is None or _is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        if self.seed is not None:
            self.seed = normalize_seed(self.seed)
        check(isinstance(self.ignore_eos, bool), f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        check(isinstance(self.stop_token_ids, (list, tuple))
              and all(_is_int(t) and 0 <= t < INT_RANGE for t in self.stop_token_ids),
              f"stop_token_ids must be a list of token ids (integers in [0, 2**63)), got {self.stop_token_ids!r}")
        check(isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) and s for s in self.stop),
              f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _finite_float(name, getattr(self, name))
            check(-MAX_PENALTY <= value <= MAX_PENALTY, f"{name} must be in [-2, 2], got {value!r}")
            setattr(self, name, value)
        self.repetition_penalty = _finite_float("repetition_penalty", self.repetition_penalty)
        check(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        self.logit_bias = self._checked_logit_bias()
        check(_is_int(self.n) and 1 <= self.n <= MAX_N, f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        self._check_constraint()

    def _check_constraint(self) -> None:
        given = [name for name in CONSTRAINT_FIELDS if getattr(self, name) is not None]
        for name in given:
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{name} must be a non-empty string, got {value!r}"[:200])
        if len(given) > 1:
            raise ConfigError(f"{given[0]}: at most one of {list(CONSTRAINT_FIELDS)} may be set, got {given}")
        after = self.constraint_after_token_id
        if after is not None and not (_is_int(after) and 0 <= after < MAX_TOKEN_ID):
            raise ConfigError(f"constraint_after_token_id must be a token id, got {after!r}")
        if after is not None and not given:
            raise ConfigError(f"constraint_after_token_id needs one of {list(CONSTRAINT_FIELDS)}")

    def _checked_logit_bias(self) -> dict[int, float]:
        if not isinstance(self.logit_bias, dict):
            raise ConfigError(f"logit_bias must be an object of token id -> bias, got {self.logit_bias!r}")
        checked = {}
        for key, bias in self.logit_bias.items():
            token = _token_id(key)
            if token is None or not 0 <= token < INT_RANGE:
                raise ConfigError(f"logit_bias keys must be token ids in [0, 2**63), got {key!r}"[:200])
            value = _finite_float(f"logit_bias value for token {token}", bias)
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ConfigError(f"logit_bias value for token {token} must be in [-100, 100], got {value!r}")
            checked[token] = value
        return checked

    def validate_vocab(self, vocab_size: int) -> None:
        """ConfigError if a logit_bias token id is outside the model's vocabulary [0, vocab_size)."""
        outside = sorted(t for t in self.logit_bias if t >= vocab_size)
        if self.constraint_after_token_id is not None and self.constraint_after_token_id >= vocab_size:
            raise ConfigError(f"constraint_after_token_id {self.constraint_after_token_id} is outside the "
                              f"vocabulary (ids 0..{vocab_size - 1})")
        if outside:
            raise ConfigError(f"logit_bias token id(s) {outside[:10]} are outside the vocabulary "
                              f"(ids 0..{vocab_size - 1})")

    def for_choice(self, index: int) -> SamplingParams:
        """The params of completion `index` of the n asked for: n = 1, and a seeded request's seed + index."""
        seed = None if self.seed is None else normalize_seed(self.seed + index)
        return replace(self, n=1, seed=seed, logit_bias=dict(self.logit_bias), stop=list(self.stop),
                       stop_token_ids=list(self.stop_token_ids))

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(field name, text) of the request's structured-output constraint, or None: the grammar cache key."""
        if self.json_schema is None and self.regex is None and self.ebnf is None:
            return None  # the common case, asked for every request of every step: no getattr loop
        for name in CONSTRAINT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                return name, value
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        """Whether sampling depends on the request's token history (so the sampler must count its tokens)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
