"""N-gram drafts for speculative decoding (vLLM's `ngram` method, "prompt lookup decoding"): draft tokens
looked up in a request's own tokens, no weights. Pure Python: the driver keeps one `NgramIndex` per request.

The rule: take the longest n in [prompt_lookup_min, prompt_lookup_max] whose last n tokens occurred earlier
in the request (an occurrence followed by at least one token); of those occurrences take the latest, and
draft the `num_speculative_tokens` tokens that followed it. A latest occurrence d tokens back says "the text
repeats with period d": when fewer than k tokens follow it, the copy runs on into the tokens it has just
drafted (an LZ77-style overlapping copy), so a repeating run always gets k drafts. vLLM takes the earliest
occurrence of the longest n-gram and drafts only the tokens that exist after it; the two agree whenever that
occurrence is followed by k tokens and is the only one.

`NgramIndex` keeps, for every n-gram of the allowed lengths that has a following token, the position where
its latest occurrence ends, updated as accepted tokens are appended: O(max - min + 1) work per token and per
proposal, however long the request."""

from __future__ import annotations

from collections.abc import Iterable

from tandem.errors import ConfigError


class NgramDrafter:
    """The settings (vLLM's names), checked once; `index()` gives a request its own lookup table."""

    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int):
        for name, value in (("num_speculative_tokens", num_speculative_tokens),
                            ("prompt_lookup_min", prompt_lookup_min), ("prompt_lookup_max", prompt_lookup_max)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if prompt_lookup_max < prompt_lookup_min:
            raise ConfigError(f"prompt_lookup_max ({prompt_lookup_max}) must be >= prompt_lookup_min "
                              f"({prompt_lookup_min})")
        self.num_speculative_tokens = num_speculative_tokens
        self.prompt_lookup_min, self.prompt_lookup_max = prompt_lookup_min, prompt_lookup_max

    def index(self, tokens: Iterable[int] = ()) -> "NgramIndex":
        return NgramIndex(self.prompt_lookup_min, self.prompt_lookup_max, tokens)

    def propose(self, index: "NgramIndex", max_tokens: int | None = None) -> list[int]:
        """Up to `num_speculative_tokens` drafts (fewer when `max_tokens`, e.g. what is left of the request's
        max_new_tokens or context, is smaller); [] when no n-gram matches."""
        k = self.num_speculative_tokens if max_tokens is None else min(self.num_speculative_tokens, max_tokens)
        return index.propose(k)


class NgramIndex:
    """One request's tokens and the latest end position of each n-gram (min_n <= n <= max_n) among them,
    counting only occurrences that end before the last token (so that something follows them)."""

    def __init__(self, min_n: int, max_n: int, tokens: Iterable[int] = ()):
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        # NOTE: tuples of different lengths never compare equal, so one dict holds every n
        self._latest_end: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append accepted tokens (never drafts that were not accepted)."""
        for token in tokens:
            self.tokens.append(int(token))
            end = len(self.tokens) - 2  # the n-grams ending there now have a following token
            if end < 0:
                continue
            for n in range(self.min_n, min(self.max_n, end + 1) + 1):
                self._latest_end[tuple(self.tokens[end - n + 1:end + 1])] = end

    def propose(self, k: int) -> list[int]:
        """Up to k drafts following the latest earlier occurrence of the longest matching suffix n-gram."""
        length = len(self.tokens)
        if k <= 0:
            return []
        for n in range(min(self.max_n, length), self.min_n - 1, -1):
            end = self._latest_end.get(tuple(self.tokens[length - n:]))
            if end is None:
                continue
            drafts: list[int] = []
            for i in range(k):
                source = end + 1 + i  # past the request's end, the copy reads the drafts it made
                drafts.append(self.tokens[source] if source < length else drafts[source - length])
            return drafts
        return []
