"""`tandem.timeline`: the figure is written, and its bars are exactly the given intervals (read back from the
figure), one row per rank, a step's bars in the same colour on every row; rows keep the steps of a window."""

from __future__ import annotations

import pytest

from tandem.timeline import RankRow, draw_timeline, rank_rows

T0 = 1_700_000_000.0
STAGE0 = [(T0 + 0.000, T0 + 0.010), (T0 + 0.011, T0 + 0.020), (T0 + 0.030, T0 + 0.041)]
STAGE1 = [(T0 + 0.010, T0 + 0.016), (T0 + 0.021, T0 + 0.027), (T0 + 0.041, T0 + 0.050)]


def bars_by_row(fig) -> dict[str, list]:
    (ax,) = fig.axes
    rows: dict[str, list] = {}
    for patch in ax.patches:
        rows.setdefault(patch.get_gid(), []).append(patch)
    return rows


def test_the_figure_draws_exactly_the_given_intervals(tmp_path):
    rows = [RankRow("pp0 tp0", STAGE0), RankRow("pp1 tp0", STAGE1)]
    out = tmp_path / "timeline.png"
    fig = draw_timeline(rows, out, num_colors=2)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = bars_by_row(fig)
    assert list(drawn) == ["pp0 tp0", "pp1 tp0"]
    ys = []
    for row in rows:
        patches = drawn[row.label]
        got = [x for p in patches for x in (p.get_x(), p.get_x() + p.get_width())]
        expected = [(t - T0) * 1e3 for interval in row.intervals for t in interval]
        assert got == pytest.approx(expected, abs=1e-9)
        ys.append({p.get_y() + p.get_height() / 2 for p in patches})
    assert ys == [{0}, {1}]
    colors = {label: [p.get_facecolor() for p in patches] for label, patches in drawn.items()}
    assert colors["pp0 tp0"] == colors["pp1 tp0"]  # step i has one colour on every row
    assert colors["pp0 tp0"][0] == colors["pp0 tp0"][2] != colors["pp0 tp0"][1]  # two micro-batches alternate
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["pp0 tp0 (60% busy)", "pp1 tp0 (42% busy)"]  # 30 and 21 of the 50 ms


def test_rank_rows_keep_the_steps_that_began_in_the_window():
    reports = [{"pp_rank": 0, "tp_rank": 0, "step_times": [list(t) for t in STAGE0]},
               {"pp_rank": 1, "tp_rank": 0, "step_times": [list(t) for t in STAGE1]}]
    rows = rank_rows(reports, start=T0 + 0.005, end=T0 + 0.045)
    assert [row.label for row in rows] == ["pp0 tp0", "pp1 tp0"]
    assert rows[0].intervals == STAGE0[1:] and rows[0].first_step == 1
    assert rows[1].intervals == STAGE1 and rows[1].first_step == 0
    assert rank_rows(reports)[0].intervals == STAGE0
