"""lmtool.train.curves draws many runs so that they stay apart: distinct looks, the legend beside the panel."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image

from lmtool.train.curves import LEGEND_INSIDE_MAX, Run, line_look, plot_runs


def fake_runs(count: int) -> list[Run]:
    return [Run(Path(f"job{i}"), f"experiment=model_{i} seed=1111",
                [{"step": s, "split": "valid", "ppl": 200.0 - 10 * s + i} for s in (1, 2, 3)]) for i in range(count)]


def test_forty_runs_look_all_different():
    looks = {tuple(sorted(line_look(i).items())) for i in range(40)}
    assert len(looks) == 40


def test_a_long_legend_goes_beside_the_panel(tmp_path):
    """Past LEGEND_INSIDE_MAX runs the figure grows to the right to hold the legend instead of covering curves."""
    few, many = tmp_path / "few.png", tmp_path / "many.png"
    plot_runs(fake_runs(LEGEND_INSIDE_MAX), few, splits=("valid",))
    plot_runs(fake_runs(LEGEND_INSIDE_MAX + 1), many, splits=("valid",))
    few_width, many_width = matplotlib.image.imread(few).shape[1], matplotlib.image.imread(many).shape[1]
    assert many_width > few_width * 1.3
