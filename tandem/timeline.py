"""The pipeline timeline: each rank's busy intervals over time, one row per rank, so bubbles show as gaps.

Intervals come from the ranks' `stage_report()["step_times"]`: the wall-clock (start, end) of each step's
computation on that rank (a later stage's interval starts when its input has arrived). Every rank runs every
step, in order, so the i-th interval of each rank is step i: bars of one step share a colour on all rows
(colours cycle with the step number, one per micro-batch in flight, so in a steady decode the same colour is
the same micro-batch). Drawing needs matplotlib (the `bench` extra)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RankRow:
    label: str  # e.g. "pp0 tp0"
    intervals: list[tuple[float, float]]  # (start, end) seconds since the epoch, in step order
    first_step: int = 0  # the step number of intervals[0]

    def busy_fraction(self, start: float, end: float) -> float:
        """The share of [start, end] this rank spent computing."""
        busy = sum(max(0.0, min(b, end) - max(a, start)) for a, b in self.intervals)
        return busy / (end - start) if end > start else 0.0


def rank_rows(reports: list[dict], start: float | None = None, end: float | None = None) -> list[RankRow]:
    """One row per rank report, keeping the steps that began in [start, end] (wall-clock seconds; None: no
    bound). Step numbers count from the first step any rank still reports: all ranks ran the same steps and
    keep the same number of the newest ones."""
    rows = []
    for report in reports:
        times = [tuple(t) for t in report["step_times"]]
        keep = [i for i, (a, _) in enumerate(times) if (start is None or a >= start) and (end is None or a <= end)]
        label = f"pp{report.get('pp_rank', 0)} tp{report.get('tp_rank', 0)}"
        rows.append(RankRow(label, [times[i] for i in keep], keep[0] if keep else 0))
    return rows


def draw_timeline(rows: list[RankRow], path: str | Path, num_colors: int = 2, title: str = ""):
    """Draw the rows' intervals (milliseconds since the earliest start) as horizontal bars into `path`
    (the format follows its suffix, e.g. .png or .svg); returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = [a for row in rows for a, _ in row.intervals]
    t0 = min(starts) if starts else 0.0
    t1 = max((b for row in rows for _, b in row.intervals), default=t0)
    colors = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(rows) + 1.6))
    for y, row in enumerate(rows):
        lefts = [(a - t0) * 1e3 for a, _ in row.intervals]
        widths = [(b - a) * 1e3 for a, b in row.intervals]
        step_colors = [colors[(row.first_step + i) % max(1, num_colors) % len(colors)] for i in range(len(lefts))]
        ax.barh([y] * len(lefts), widths, left=lefts, height=0.7, color=step_colors, edgecolor="black",
                linewidth=0.3, gid=row.label)
    ax.set_yticks(range(len(rows)),
                  [f"{row.label} ({100 * row.busy_fraction(t0, t1):.0f}% busy)" for row in rows])
    ax.invert_yaxis()  # the first stage on top
    ax.set_xlabel("time (ms)")
    ax.set_title(title or f"busy intervals per rank; colours: step number mod {num_colors}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
