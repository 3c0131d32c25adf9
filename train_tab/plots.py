"""Line plots as inline SVG, drawn on the server: one ``<path>`` with an explicit stroke
colour per series, a marker on every point (so a single point is visible), a legend,
and axes with round-number ticks.

Why not ``gr.LinePlot``: its Vega spec fixes the colour domain from the first value it
renders, so series that arrive later (every live run starts empty) are drawn with no
stroke and an empty legend, and a one-point line has no length. Here nothing depends on
what the browser saw before: every update is a complete picture.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#17becf", "#7f7f7f", "#bcbd22")
Series = dict[str, list[tuple[float, float]]]  # name -> [(x, y), ...] sorted by x
WIDTH, HEIGHT = 560, 260
MARGIN = {"left": 64, "right": 12, "top": 30, "bottom": 40}
LEGEND_ROW = 18


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [lo, hi] (1, 2, 2.5, 5 x 10^n steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def tick_label(value: float, step: float) -> str:
    """A short label: whole numbers as integers, others with four significant digits."""
    if abs(value) < abs(step) * 1e-9:
        return "0"
    if step >= 1 and float(value).is_integer():
        return str(int(value))
    return f"{value:.4g}"


def colour_for(name: str, names: Sequence[str]) -> str:
    """A stable colour per series name within one plot."""
    return PALETTE[list(names).index(name) % len(PALETTE)]


def svg_plot(series: Series, title: str, x_label: str = "step", y_label: str = "value",
             plot_id: str = "", empty_text: str = "no data yet") -> str:
    """An SVG line plot (as HTML text) of ``series``; a note instead when it is empty."""
    series = {k: [(float(x), float(y)) for x, y in v if _finite(x) and _finite(y)]
              for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    names = list(series)
    rows = math.ceil(len(names) / 3)
    height = HEIGHT + 12 + rows * LEGEND_ROW
    attrs = (f'class="hsd-plot" data-plot="{html.escape(plot_id)}" '
             f'viewBox="0 0 {WIDTH} {height}" width="100%" role="img" '
             f'aria-label="{html.escape(title)}" style="max-width:{WIDTH * 1.6:.0f}px;'
             'font-family:sans-serif;font-size:11px;background:#fff"')
    out = [f"<svg {attrs}>",
           f'<text x="{WIDTH / 2}" y="18" text-anchor="middle" font-size="13" '
           f'font-weight="600">{html.escape(title)}</text>']
    if not names:
        out.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" fill="#777">'
                   f"{html.escape(empty_text)}</text></svg>")
        return "".join(out)
    xs = [x for v in series.values() for x, _ in v]
    ys = [y for v in series.values() for _, y in v]
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    left, top = MARGIN["left"], MARGIN["top"]
    pw, ph = WIDTH - left - MARGIN["right"], HEIGHT - top - MARGIN["bottom"]

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" '
               'stroke="#ccc"/>')
    x_step, y_step = x_ticks[1] - x_ticks[0], y_ticks[1] - y_ticks[0]
    for t in x_ticks:
        out.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top}" y2="{top + ph}" '
                   f'stroke="#eee"/><text x="{px(t):.1f}" y="{top + ph + 14}" '
                   f'text-anchor="middle" fill="#333">{tick_label(t, x_step)}</text>')
    for t in y_ticks:
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" '
                   f'stroke="#eee"/><text x="{left - 5}" y="{py(t) + 4:.1f}" '
                   f'text-anchor="end" fill="#333">{tick_label(t, y_step)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{top + ph + 32}" text-anchor="middle" '
               f'fill="#333">{html.escape(x_label)}</text>')
    out.append(f'<text transform="translate(14 {top + ph / 2}) rotate(-90)" '
               f'text-anchor="middle" fill="#333">{html.escape(y_label)}</text>')
    marker_r = 3.0 if max(len(v) for v in series.values()) <= 60 else 1.6
    for name, points in series.items():
        colour = colour_for(name, names)
        d = " ".join(f"{'M' if i == 0 else 'L'}{px(x):.1f},{py(y):.1f}"
                     for i, (x, y) in enumerate(points))
        out.append(f'<g class="hsd-series" data-series="{html.escape(name)}">'
                   f'<path class="hsd-line" d="{d}" fill="none" stroke="{colour}" '
                   f'stroke-width="2" stroke-linejoin="round"/>')
        for x, y in points:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{marker_r}" '
                       f'fill="{colour}"><title>{html.escape(name)}: step {x:g}, '
                       f"{y:.5g}</title></circle>")
        out.append("</g>")
    for i, name in enumerate(names):  # legend under the x-axis label, three per row
        lx = left + (i % 3) * (pw / 3)
        ly = HEIGHT + 10 + (i // 3) * LEGEND_ROW
        last = series[name][-1][1]
        out.append(f'<g class="hsd-legend"><line x1="{lx:.1f}" x2="{lx + 18:.1f}" y1="{ly - 4}" '
                   f'y2="{ly - 4}" stroke="{colour_for(name, names)}" stroke-width="3"/>'
                   f'<text x="{lx + 23:.1f}" y="{ly}" fill="#222">{html.escape(name)} '
                   f'({last:.4g})</text></g>')
    out.append("</svg>")
    return "".join(out)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
