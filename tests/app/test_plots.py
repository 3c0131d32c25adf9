"""The run plots (SVG drawn on the server): every series a coloured line with a legend
entry, a single point visible, round tick labels, one panel per loss term."""

from __future__ import annotations

import re

from train_tab import controller as ctl
from train_tab.plots import nice_ticks, svg_plot


def _strokes(svg: str) -> list[str]:
    return re.findall(r'<path class="hsd-line" d="[^"]*" fill="none" stroke="(#[0-9a-f]{6})"', svg)


def test_each_series_is_a_coloured_line_with_a_legend_entry():
    svg = svg_plot({"digits-quality": [(10, 0.80), (20, 0.90), (30, 0.94)],
                    "digits-alignment": [(10, 0.90), (20, 0.92), (30, 0.93)]}, "Rewards")
    strokes = _strokes(svg)
    assert len(strokes) == 2 and len(set(strokes)) == 2
    assert svg.count('class="hsd-legend"') == 2
    assert "digits-quality (0.94)" in svg and "digits-alignment (0.93)" in svg
    assert ">step</text>" in svg


def test_a_single_point_is_visible_with_round_ticks():
    svg = svg_plot({"digits-quality": [(50, 0.9)]}, "Rewards")
    assert re.search(r'<circle cx="[\d.]+" cy="[\d.]+" r="3.0" fill="#[0-9a-f]{6}"', svg)
    labels = re.findall(r'text-anchor="middle" fill="#333">([^<]+)</text>', svg)
    assert "50" in labels and not any("." in lb for lb in labels[:-1])  # x ticks: integers


def test_nice_ticks_cover_the_range():
    for lo, hi in [(0.0003, 0.0007), (1, 600), (-1.2, 0.3), (5, 5)]:
        ticks = nice_ticks(lo, hi)
        assert ticks[0] <= lo and ticks[-1] >= hi and 2 <= len(ticks) <= 12


def test_loss_panels_per_term_and_lr():
    records = [{"step": s, "loss": 1.0 / s, "loss_consistency": 1.0 / s, "lr": 1e-4 * s}
               for s in (1, 2, 3)]
    loss, reward, lr = ctl.plots_html(records)
    assert loss.count("<svg") == 1  # the only term equals the total: one panel
    assert len(_strokes(lr)) == 1 and "learning rate" in lr
    assert "no reward scores logged" in reward
    records = [{**r, "loss": r["loss"] + 0.5, "loss_adv_g": 0.5} for r in records]
    loss, _, _ = ctl.plots_html(records)
    assert loss.count("<svg") == 3  # total, consistency, adversarial generator
    assert 'data-plot="loss:loss_adv_g"' in loss
