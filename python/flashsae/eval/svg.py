"""Small inline-SVG charts for the HTML report (line charts and a histogram), so the report needs no
plotting library and stays one self-contained file: each chart is a few kB of text in the page.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

#: Series colours (colour-blind-safe, Okabe & Ito 2008).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
WIDTH, HEIGHT = 460, 260
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 58, 14, 30, 42


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2, 5 x 10^k steps) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high <= low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(0.0 if abs(value) < step * 1e-9 else value)
        value += step
    return ticks


def format_number(value: float) -> str:
    """Compact label: 1.5k, 2M, 0.25, 1e-05."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= threshold:
            return f"{value / threshold:.3g}{suffix}"
    if magnitude < 1e-3:
        return f"{value:.1e}"
    return f"{value:.3g}"


def _frame(title: str, x_label: str, y_label: str, body: list[str], *, label: str) -> str:
    return "".join(
        [
            f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
            f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(label)}">',
            f'<text x="{WIDTH / 2}" y="18" text-anchor="middle" class="chart-title">{escape(title)}</text>',
            *body,
            f'<text x="{MARGIN_LEFT + (WIDTH - MARGIN_LEFT - MARGIN_RIGHT) / 2}" y="{HEIGHT - 6}" '
            f'text-anchor="middle" class="axis-label">{escape(x_label)}</text>',
            f'<text transform="translate(14,{MARGIN_TOP + (HEIGHT - MARGIN_TOP - MARGIN_BOTTOM) / 2}) rotate(-90)" '
            f'text-anchor="middle" class="axis-label">{escape(y_label)}</text>',
            "</svg>",
        ]
    )


class _Axes:
    """Maps data coordinates to the plot area."""

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float]) -> None:
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range
        self.left, self.right = MARGIN_LEFT, WIDTH - MARGIN_RIGHT
        self.top, self.bottom = MARGIN_TOP, HEIGHT - MARGIN_BOTTOM

    def x(self, value: float) -> float:
        span = self.x1 - self.x0 or 1.0
        return self.left + (value - self.x0) / span * (self.right - self.left)

    def y(self, value: float) -> float:
        span = self.y1 - self.y0 or 1.0
        return self.bottom - (value - self.y0) / span * (self.bottom - self.top)

    def grid(self, x_ticks: Sequence[float], y_ticks: Sequence[float], x_format=format_number) -> list[str]:
        parts = [
            f'<rect x="{self.left}" y="{self.top}" width="{self.right - self.left}" '
            f'height="{self.bottom - self.top}" class="plot-area"/>'
        ]
        for tick in y_ticks:
            y = self.y(tick)
            parts.append(f'<line x1="{self.left}" x2="{self.right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
            parts.append(
                f'<text x="{self.left - 5}" y="{y + 4:.1f}" text-anchor="end" class="tick">{format_number(tick)}</text>'
            )
        for tick in x_ticks:
            x = self.x(tick)
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{self.top}" y2="{self.bottom}" class="grid"/>')
            parts.append(
                f'<text x="{x:.1f}" y="{self.bottom + 15}" text-anchor="middle" class="tick">{x_format(tick)}</text>'
            )
        return parts


def line_chart(
    series: dict[str, list[tuple[float, float]]], *, title: str, x_label: str, y_label: str, y_from_zero: bool = False
) -> str:
    """Lines of (x, y) points, one per named series (non-finite points are skipped), with a legend
    when there is more than one series. y_from_zero: the y axis starts at 0 (for counts, fractions
    and percentages, which cannot be negative; all-zero data gets the axis 0 to 1)."""
    points = {
        name: [(x, y) for x, y in values if math.isfinite(x) and math.isfinite(y)] for name, values in series.items()
    }
    points = {name: values for name, values in points.items() if values}
    if not points:
        return _frame(
            title,
            x_label,
            y_label,
            [f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" class="tick">no data</text>'],
            label=f"{title}: no data",
        )
    xs = [x for values in points.values() for x, _ in values]
    ys = [y for values in points.values() for _, y in values]
    y_low = 0.0 if y_from_zero else min(ys)
    y_high = max(ys) if not y_from_zero or max(ys) > 0 else 1.0
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(y_low, y_high)
    axes = _Axes(
        (min([*x_ticks, min(xs)]), max([*x_ticks, max(xs)])), (min([*y_ticks, y_low]), max([*y_ticks, y_high]))
    )
    body = axes.grid(x_ticks, y_ticks)
    for number, (name, values) in enumerate(points.items()):
        colour = PALETTE[number % len(PALETTE)]
        path = " ".join(f"{axes.x(x):.1f},{axes.y(y):.1f}" for x, y in values)
        body.append(
            f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.8" class="series">'
            f"<title>{escape(name)}</title></polyline>"
        )
        if len(values) == 1:
            x, y = values[0]
            body.append(f'<circle cx="{axes.x(x):.1f}" cy="{axes.y(y):.1f}" r="3" fill="{colour}"/>')
    if len(points) > 1:
        for number, name in enumerate(points):
            y = MARGIN_TOP + 8 + 14 * number
            colour = PALETTE[number % len(PALETTE)]
            body.append(f'<rect x="{axes.right - 150}" y="{y - 8}" width="10" height="10" fill="{colour}"/>')
            body.append(f'<text x="{axes.right - 136}" y="{y + 1}" class="legend">{escape(name[-24:])}</text>')
    return _frame(title, x_label, y_label, body, label=f"{title} ({', '.join(points)})")


def histogram_chart(
    edges: Sequence[float], counts: Sequence[int], *, title: str, x_label: str, y_label: str, note: str = ""
) -> str:
    """Bars of counts between consecutive edges; `note` is written in the top-left corner."""
    if len(edges) != len(counts) + 1 or not counts:
        raise ValueError(f"edges: expected len(counts) + 1 = {len(counts) + 1} edges, got {len(edges)}")
    top = max(max(counts), 1)
    x_ticks = nice_ticks(edges[0], edges[-1])
    y_ticks = nice_ticks(0, top)
    axes = _Axes((edges[0], edges[-1]), (0, max([*y_ticks, top])))
    body = axes.grid([t for t in x_ticks if edges[0] <= t <= edges[-1]], y_ticks)
    for low, high, count in zip(edges[:-1], edges[1:], counts, strict=True):
        if count <= 0:
            continue
        x, width = axes.x(low), max(axes.x(high) - axes.x(low) - 0.6, 0.6)
        y = axes.y(count)
        body.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{axes.bottom - y:.1f}" class="bar">'
            f"<title>{count} latents in [{low:.2f}, {high:.2f})</title></rect>"
        )
    if note:
        body.append(f'<text x="{axes.left + 6}" y="{axes.top + 14}" class="note">{escape(note)}</text>')
    return _frame(title, x_label, y_label, body, label=f"{title}: {sum(counts)} latents")
