"""`TextStream`: one request's streamed text, as deltas whose concatenation equals its final text.

While the request runs, its new tokens are decoded incrementally (`IncrementalDetokenizer`: a window of
recent tokens per update, not the whole output), and the newest text that could be the start of a stop
string is held back, since the final text is cut before a matched stop string. Text already sent never
ends with such a start, so no match can begin inside it: only the held-back text needs checking. When the
request has finished, its final text (`bridge.text_of`) is decoded once and what of it was not sent yet is
the last delta."""

from __future__ import annotations

import logging

from tandem.runtime.scheduling.detokenizer import IncrementalDetokenizer

logger = logging.getLogger("tandem.server")


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could be the beginning of one of `stops`."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


class TextStream:
    """`bridge` needs `decode(ids)` and `text_of(req)` (an `EngineBridge`); `stop` the request's stop strings."""

    def __init__(self, bridge, stop: list[str]):
        self.bridge, self.stop = bridge, list(stop)
        self.detokenizer = IncrementalDetokenizer(bridge.decode)
        self.pieces: list[str] = []  # the deltas sent
        self.pending = ""  # decoded text not sent yet: the possible start of a stop string

    @property
    def sent(self) -> str:
        return "".join(self.pieces)

    def update(self, req) -> str:
        """The new text since the last call; after the request finished, everything that is left."""
        if req.finished:
            return self._finish(req)
        self.pending += self.detokenizer.update(req.output_ids)  # read-only windows of a list that only grows
        ready = len(self.pending) - held_back(self.pending, self.stop)
        delta, self.pending = self.pending[:ready], self.pending[ready:]
        if delta:
            self.pieces.append(delta)
        return delta

    def _finish(self, req) -> str:
        text, sent = self.bridge.text_of(req), self.sent
        self.pieces, self.pending = [text], ""
        if not text.startswith(sent):
            logger.warning("streamed text diverged from the final text of request %s", req.rid)
            return ""
        return text[len(sent):]
