"""`Speculation`: the driver's side of speculative decoding (pure Python). It decides each decoding request's
drafts (NGRAM: looked up in the request's accepted tokens with its `NgramIndex`; NEXTN: the drafts the last
stage returned with the request's previous result), and queues what the ranks must apply before the
request's slot or page table is read again:

- `spec_commits` (state slot, j): the slot's linear-attention state moves on by its verify span's first
  j + 1 tokens on every stage; `spec_discards`: the span of a request that ended meanwhile is forgotten;
- `page_trims` (request, pages kept): pages wholly past the accepted length went back to the allocator.

They ride on the next step planned after the result came back. Every rank runs steps in order and a request
is in at most one step in flight, so they arrive before anything else touches that slot or table, with any
number of micro-batches in flight. A restart of the ranks forgets them (`reset`): the fresh ranks have no
pending spans, and requests are prefilled again from their accepted tokens only.

Penalties and top-N logprobs follow each verified position's own history on the last stage
(`tandem.runtime.sampling.verify_step`); structured output cuts the drafts to what the grammar allows and
masks every verified position (`ConstraintHooks.admissible_drafts`, `masks`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.errors import ConfigError
from tandem.runtime.scheduling.ngram_draft import NgramDrafter
from tandem.runtime.scheduling.request import Request
from tandem.runtime.step import RequestKey


@dataclass
class SpecCounters:
    """Totals over the engine's life: verify passes, drafts proposed (sent to be verified), drafts accepted."""

    verify_passes: int = 0
    proposed_drafts: int = 0
    accepted_drafts: int = 0


@dataclass
class Pending:
    commits: list[tuple[int, int]] = field(default_factory=list)
    discards: list[int] = field(default_factory=list)
    trims: list[tuple[RequestKey, int]] = field(default_factory=list)


class Speculation:
    def __init__(self, algorithm: str, num_steps: int, ngram_min: int = 1, ngram_max: int = 12):
        if algorithm not in ("NGRAM", "NEXTN"):
            raise ConfigError(f"unsupported speculative algorithm {algorithm!r}")
        self.algorithm, self.num_steps = algorithm, num_steps
        self.ngram = NgramDrafter(num_steps, ngram_min, ngram_max) if algorithm == "NGRAM" else None
        self.counters = SpecCounters()
        self.pending = Pending()
        # NEXTN: the MTP head's chain writes its KV at positions up to num_steps - 1 past the last final one,
        # in the request's own pages: a step that samples needs pages for that many more tokens
        self.chain_tokens = num_steps - 1 if algorithm == "NEXTN" else 0

    def drafts_for(self, req: Request, max_drafts: int) -> list[int]:
        """Up to `max_drafts` drafts for req's next verify span ([]: a plain decode step)."""
        if max_drafts <= 0:
            return []
        if self.ngram is None:
            return list(req.next_drafts[:max_drafts])
        if req.ngram_index is None:
            req.ngram_index = self.ngram.index()
        index = req.ngram_index
        if len(index) < req.num_tokens:  # catch up with the tokens accepted since (only ever accepted ones)
            index.extend(req.ids_between(len(index), req.num_tokens))
        return self.ngram.propose(index, max_drafts)

    def judged(self, slot: int, req: Request, num_drafts: int, accepted: int | None) -> None:
        """A verify span of `num_drafts` drafts at state slot `slot` came back: `accepted` drafts kept, or
        None when the span is dropped (its request ended while it ran, or it failed)."""
        if accepted is None:
            self.pending.discards.append(slot)
            return
        self.pending.commits.append((slot, accepted))
        self.counters.verify_passes += 1
        self.counters.proposed_drafts += num_drafts
        self.counters.accepted_drafts += accepted
        req.spec_verify_ct += 1
        req.spec_proposed_drafts += num_drafts
        req.spec_accepted_drafts += accepted

    def trimmed(self, req: Request, num_pages: int) -> None:
        self.pending.trims.append((req.rid, num_pages))

    def take(self) -> Pending:
        """What the next step carries to the ranks (once)."""
        taken, self.pending = self.pending, Pending()
        return taken

    def reset(self) -> None:
        """The ranks were restarted: they hold no pending verify span."""
        self.pending = Pending()
