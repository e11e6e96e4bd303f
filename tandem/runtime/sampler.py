"""Sampling parameters (validated) and the sampler: greedy, temperature, top-k, top-p, min-p, per-request seed.

Reported logprobs are those of the model's distribution (log-softmax of the raw logits) for the chosen token."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from tandem.errors import ConfigError


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

    @classmethod
    def from_dict(cls, values: dict | None) -> "SamplingParams":
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown sampling parameter(s) {unknown}; expected some of {sorted(known)}")
        if isinstance(values.get("stop"), str):
            values["stop"] = [values["stop"]]
        params = cls(**values)
        params.validate()
        return params

    def validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
        is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        check(is_int(self.max_new_tokens) and self.max_new_tokens >= 0,
              f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        check(is_num(self.temperature) and self.temperature >= 0,
              f"temperature must be a number >= 0, got {self.temperature!r}")
        check(is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1),
              f"top_k must be -1 (off) or a positive integer, got {self.top_k!r}")
        check(is_num(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        check(is_num(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        check(self.seed is None or (is_int(self.seed) and -2 ** 63 <= self.seed < 2 ** 64),
              f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        check(isinstance(self.ignore_eos, bool), f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        check(isinstance(self.stop_token_ids, (list, tuple)) and all(is_int(t) for t in self.stop_token_ids),
              f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")
        check(isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) and s for s in self.stop),
              f"stop must be a string or a list of non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    """Keeps one torch.Generator per seeded request so that seeded sampling is reproducible."""

    def __init__(self):
        self.generators: dict[object, torch.Generator] = {}

    def release(self, request_key) -> None:
        self.generators.pop(request_key, None)

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], keys: list) -> tuple[list[int], list[float]]:
        """logits: [B, V] float32. Returns (token ids, logprobs of those tokens)."""
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = torch.argmax(logits, dim=-1)
        for row, (p, key) in enumerate(zip(params, keys)):
            if not p.greedy:
                tokens[row] = self._sample_row(logits[row], p, key)
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
        return tokens.tolist(), chosen.tolist()

    def _sample_row(self, logits: torch.Tensor, p: SamplingParams, key) -> int:
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.top_k > 0:
            kth = torch.topk(probs, min(p.top_k, probs.numel())).values[-1]
            probs = torch.where(probs >= kth, probs, 0.0)
        if p.min_p > 0:
            probs = torch.where(probs >= p.min_p * probs.max(), probs, 0.0)
        if p.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, 0) / sorted_probs.sum()
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            drop = (cumulative - sorted_probs / sorted_probs.sum()) >= p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        generator = None
        if p.seed is not None:
            generator = self.generators.get(key)
            if generator is None:
                generator = self.generators[key] = torch.Generator().manual_seed(p.seed)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
