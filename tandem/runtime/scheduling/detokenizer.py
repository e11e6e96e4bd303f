"""`IncrementalDetokenizer`: the text of a growing list of token ids, decoding only a short window of recent
tokens per call instead of the whole list (the method of vLLM's and SGLang's detokenizers).

Two offsets into the ids are kept: `read_offset`, up to where the text is final, and `prefix_offset`, where
the previous window started. Each call decodes ids[prefix_offset:read_offset] and ids[prefix_offset:] and
takes the difference as the new text. Decoding from the same starting token both times cancels what a
tokenizer does at the start of a sequence (SentencePiece drops the leading space of the first word), so the
pieces join up to the text of decoding all ids at once. New text that ends in U+FFFD (the bytes of a
character are split across tokens) or is empty (special tokens that decode to nothing) is held back until a
later token completes it; the offsets move only past complete text."""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT_CHARACTER = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.prefix_offset = 0
        self.read_offset = 0  # the text of ids[:read_offset] has been returned

    def update(self, ids: list[int]) -> str:
        """The text that `ids` (all ids so far; each call's list extends the previous one) add to what earlier
        calls returned; "" while the newest tokens do not yet complete a character."""
        end = len(ids)
        if end <= self.read_offset:
            return ""
        prefix_text = self.decode(ids[self.prefix_offset:self.read_offset]) if self.read_offset > self.prefix_offset else ""
        new_text = self.decode(ids[self.prefix_offset:end])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHARACTER):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, end
        return delta


class StopStringWatch:
    """Whether a request's output text contains one of its stop strings, fed the growing output ids after
    every token: only the new text plus the last (longest stop - 1) characters before it are searched, so
    each token costs a short window instead of decoding and searching the whole output. A stop string is
    found on the first token that completes it, as a search of the whole text would find it."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]):
        self.text = IncrementalDetokenizer(decode)
        self.stops = [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.tail = ""

    def feed(self, ids: list[int]) -> str | None:
        """The first stop string (in the order given) inside the text so far, or None."""
        window = self.tail + self.text.update(ids)
        for stop in self.stops:
            if stop in window:
                return stop
        self.tail = window[-self.keep:] if self.keep else ""
        return None
