"""Small self-contained SVG charts, embeddable in Prefect markdown artifacts as data URIs."""

from __future__ import annotations

import base64
import math
from html import escape

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def line_chart_svg(series: dict[str, list[tuple[float, float]]], title: str, x_label: str = "iteration",
                   y_label: str = "", width: int = 640, height: int = 300, log_y: bool = False) -> str:
    """One or more (x, y) series as a line chart with axes, ticks and a legend; white background."""
    points = [(x, y) for values in series.values() for x, y in values if y is not None and math.isfinite(y)]
    left, right, top, bottom = 64, 16, 32, 44
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>']
    if not points:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data yet</text></svg>')
        return "".join(parts)
    use_log = log_y and all(y > 0 for _, y in points)
    transform = math.log10 if use_log else float
    xs = [x for x, _ in points]
    ys = [transform(y) for _, y in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (transform(y) - y0) / (y1 - y0) * plot_h

    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
    for i in range(5):
        fx, fy = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        label_y = 10**fy if use_log else fy
        parts.append(f'<text x="{px(fx):.1f}" y="{height - bottom + 14}" text-anchor="middle">{fx:,.0f}</text>')
        ty = top + plot_h - (fy - y0) / (y1 - y0) * plot_h
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 4}" y="{ty + 4:.1f}" text-anchor="end">{label_y:.3g}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">{escape(x_label)}</text>')
    parts.append(f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" transform="rotate(-90 14 {top + plot_h / 2})">{escape(y_label)}</text>')
    for index, (name, values) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        clean = [(x, y) for x, y in values if y is not None and math.isfinite(y)]
        if clean:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in clean)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{path}"/>')
        parts.append(f'<rect x="{left + 8 + index * 110}" y="{top + 6}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{left + 22 + index * 110}" y="{top + 15}">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def markdown_image(svg: str, alt: str) -> str:
    """Markdown that shows an SVG inline (the Prefect UI renders data-URI images)."""
    return f"![{alt}](data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()})"
