"""Small bar charts as inline SVG, drawn on the server: no JavaScript, readable without
colour (each has a text title for screen readers and hover)."""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

WIDTH, HEIGHT = 300, 60


def bars(values: Sequence[float | None], title: str, unit: str = "") -> Markup:
    n = max(len(values), 1)
    top = max((v for v in values if v is not None), default=0.0) or 1.0
    slot = WIDTH / n
    parts = []
    for i, v in enumerate(values):
        if v is None:
            continue
        h = max(1.0, HEIGHT * v / top) if v > 0 else 0.0
        parts.append(
            f'<rect x="{i * slot:.1f}" y="{HEIGHT - h:.1f}" width="{max(slot - 1, 1):.1f}" '
            f'height="{h:.1f}"><title>{v:g}{escape(unit)}</title></rect>'
        )
    label = escape(title)
    return Markup(
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" preserveAspectRatio="none" '
        f'role="img" aria-label="{label}"><title>{label}</title>'
        f'<line x1="0" y1="{HEIGHT}" x2="{WIDTH}" y2="{HEIGHT}" class="axis"/>'
        + "".join(parts)
        + "</svg>"
    )
