"""Inline SVG charts for the report, drawn in Python: no JavaScript library, no network.

Two kinds: a scatter (one colour per series, optional Pareto frontier line per series) and
grouped bars with min-max whiskers. All text is escaped; sizes are fixed so the page lays out
the same everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#17becf")
W, H = 560, 340
ML, MR, MT, MB = 64, 16, 34, 48  # margins: left, right, top, bottom


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    series: str
    label: str


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(math.ceil((hi - start) / step) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or v == int(v) else f"{v:.3g}"


class _Frame:
    """Axes with ticks and labels; maps data to pixels."""

    def __init__(self, xs: list[float], ys: list[float], title: str, x_label: str,
                 y_label: str) -> None:
        self.xt = nice_ticks(min(xs), max(xs)) if xs else [0.0, 1.0]
        self.yt = nice_ticks(0.0, max(ys, default=1.0))
        self.parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{W}" height="{H}" '
            f'viewBox="0 0 {W} {H}" role="img" aria-label="{escape(title)}">',
            f'<rect width="{W}" height="{H}" fill="#fff"/>',
            f'<text x="{W / 2}" y="20" text-anchor="middle" font-weight="bold">'
            f"{escape(title)}</text>",
            f'<text x="{(ML + W - MR) / 2}" y="{H - 8}" text-anchor="middle">'
            f"{escape(x_label)}</text>",
            f'<text transform="translate(14 {(MT + H - MB) / 2}) rotate(-90)" '
            f'text-anchor="middle">{escape(y_label)}</text>',
        ]
        for v in self.yt:
            y = self.py(v)
            self.parts.append(f'<line x1="{ML}" x2="{W - MR}" y1="{y:.1f}" y2="{y:.1f}" '
                              f'stroke="#e5e5e5"/><text x="{ML - 6}" y="{y + 4:.1f}" '
                              f'text-anchor="end">{_fmt(v)}</text>')
        self.parts.append(f'<line x1="{ML}" x2="{ML}" y1="{MT}" y2="{H - MB}" stroke="#333"/>'
                          f'<line x1="{ML}" x2="{W - MR}" y1="{H - MB}" y2="{H - MB}" '
                          f'stroke="#333"/>')

    def px(self, v: float) -> float:
        lo, hi = self.xt[0], self.xt[-1]
        return ML + (v - lo) / ((hi - lo) or 1.0) * (W - ML - MR)

    def py(self, v: float) -> float:
        lo, hi = self.yt[0], self.yt[-1]
        return H - MB - (v - lo) / ((hi - lo) or 1.0) * (H - MT - MB)

    def x_ticks(self) -> None:
        for v in self.xt:
            x = self.px(v)
            self.parts.append(f'<text x="{x:.1f}" y="{H - MB + 16}" text-anchor="middle">'
                              f"{_fmt(v)}</text>")

    def legend(self, names: list[str]) -> None:
        for i, name in enumerate(names):
            y = MT + 4 + 16 * i
            self.parts.append(f'<rect x="{W - MR - 150}" y="{y}" width="10" height="10" '
                              f'fill="{PALETTE[i % len(PALETTE)]}"/><text x="{W - MR - 135}" '
                              f'y="{y + 9}">{escape(name[:22])}</text>')

    def svg(self) -> str:
        return "".join(self.parts) + "</svg>"


def scatter(points: list[Point], title: str, x_label: str, y_label: str,
            frontiers: dict[str, list[Point]] | None = None) -> str:
    """Scatter plot; ``frontiers`` draws a dashed line through each series' Pareto points."""
    f = _Frame([p.x for p in points], [p.y for p in points], title, x_label, y_label)
    f.x_ticks()
    series = list(dict.fromkeys(p.series for p in points))
    colour = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(series)}
    for s, front in (frontiers or {}).items():
        pts = sorted(front, key=lambda p: p.x)
        if len(pts) > 1:
            path = " ".join(f"{f.px(p.x):.1f},{f.py(p.y):.1f}" for p in pts)
            f.parts.append(f'<polyline points="{path}" fill="none" stroke="{colour[s]}" '
                           f'stroke-dasharray="5 4" stroke-width="1.5"/>')
    for p in points:
        x, y = f.px(p.x), f.py(p.y)
        f.parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{colour[p.series]}">'
                       f"<title>{escape(f'{p.series}: {p.label} ({p.x:.4g}, {p.y:.4g})')}"
                       f'</title></circle><text x="{x + 7:.1f}" y="{y - 6:.1f}" '
                       f'font-size="10">{escape(p.label[:24])}</text>')
    f.legend(series)
    return f.svg()


def bars(groups: list[str], series: list[str],
         values: dict[tuple[str, str], tuple[float, float, float]], title: str,
         y_label: str) -> str:
    """Grouped bars: one group per entry of ``groups``, one bar per series; value is
    (median, min, max) and draws a min-max whisker."""
    highs = [v[2] for v in values.values()]
    f = _Frame([0.0, 1.0], highs, title, "", y_label)
    slot = (W - ML - MR) / max(1, len(groups))
    bw = slot * 0.8 / max(1, len(series))
    for gi, g in enumerate(groups):
        x0 = ML + gi * slot + slot * 0.1
        f.parts.append(f'<text x="{ML + (gi + 0.5) * slot:.1f}" y="{H - MB + 16}" '
                       f'text-anchor="middle" font-size="10">{escape(g[:28])}</text>')
        for si, s in enumerate(series):
            if (g, s) not in values:
                continue
            med, lo, hi = values[(g, s)]
            x = x0 + si * bw
            y = f.py(med)
            f.parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw * 0.9:.1f}" '
                f'height="{H - MB - y:.1f}" fill="{PALETTE[si % len(PALETTE)]}">'
                f"<title>{escape(f'{s} / {g}: {med:.4g} ({lo:.4g}-{hi:.4g})')}</title></rect>"
                f'<line x1="{x + bw * 0.45:.1f}" x2="{x + bw * 0.45:.1f}" y1="{f.py(lo):.1f}" '
                f'y2="{f.py(hi):.1f}" stroke="#222"/>')
    f.legend(series)
    return f.svg()
