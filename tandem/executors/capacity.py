"""`Capacity`: what every stage can hold, from the ranks' start-up reports. The ranks agree on their pool sizes
when they start (the minimum over the world), so the values are equal on every rank; the minimum is taken
here again so that a disagreement could only make the driver more careful."""

from __future__ import annotations

from dataclasses import dataclass

from tandem.runtime.stage_report import StageReport


@dataclass(frozen=True)
class Capacity:
    max_total_tokens: int  # KV tokens of every stage's pool
    page_size: int
    max_running_requests: int
    context_length: int

    @property
    def max_len(self) -> int:
        """Tokens one request may reach: the context length, and no more than the pool holds."""
        return min(self.context_length, self.max_total_tokens)


def capacity_of(reports: list[StageReport]) -> Capacity:
    sizes = {r.page_size for r in reports}
    if len(sizes) != 1:
        raise RuntimeError(f"ranks disagree on the page size: {sorted(sizes)}")
    return Capacity(min(r.max_total_tokens for r in reports), sizes.pop(),
                    min(r.max_running_requests for r in reports), min(r.context_length for r in reports))
