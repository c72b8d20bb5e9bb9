"""The histogram of a batch's scores with the threshold drawn, as an inline SVG (no plotting library, no network)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["histogram_svg"]

_WIDTH, _HEIGHT, _MARGIN = 480, 160, 24


def histogram_svg(scores: Sequence[float], threshold: float, bins: int = 20) -> str:
    """Bars of the scores on [0, 1] in ``bins`` bins, normal bins blue and anomalous ones red, a threshold line.

    Args:
        scores: Normalised image scores.
        threshold: Where the line is drawn (and which side a bin's colour says).
        bins: Number of equal bins on [0, 1].
    """
    counts = [0] * bins
    for score in scores:
        counts[min(int(score * bins), bins - 1)] += 1
    tallest = max(counts, default=0) or 1
    plot_width, plot_height = _WIDTH - 2 * _MARGIN, _HEIGHT - 2 * _MARGIN
    bar_width = plot_width / bins
    bars = []
    for index, count in enumerate(counts):
        height = plot_height * count / tallest
        x, y = _MARGIN + index * bar_width, _MARGIN + plot_height - height
        colour = "#d62728" if (index + 0.5) / bins > threshold else "#1f77b4"
        bars.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_width - 1:.1f}" height="{height:.1f}" fill="{colour}">'
            f"<title>{index / bins:.2f}-{(index + 1) / bins:.2f}: {count}</title></rect>"
        )
    line_x = _MARGIN + plot_width * min(max(threshold, 0.0), 1.0)
    axis_y = _MARGIN + plot_height
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_WIDTH} {_HEIGHT}" width="{_WIDTH}" '
        f'height="{_HEIGHT}" role="img" '
        f'aria-label="Histogram of {len(scores)} scores, threshold {threshold:.3f}">'
        + "".join(bars)
        + f'<line x1="{_MARGIN}" y1="{axis_y}" x2="{_WIDTH - _MARGIN}" y2="{axis_y}" stroke="#555"/>'
        + f'<line class="threshold" x1="{line_x:.1f}" y1="{_MARGIN - 8}" x2="{line_x:.1f}" y2="{axis_y}" '
        'stroke="#000" stroke-width="2" stroke-dasharray="4 2"/>'
        + f'<text x="{line_x + 4:.1f}" y="{_MARGIN - 10}" font-size="11">threshold {threshold:.3f}</text>'
        + f'<text x="{_MARGIN}" y="{_HEIGHT - 6}" font-size="11">0</text>'
        + f'<text x="{_WIDTH - _MARGIN - 6}" y="{_HEIGHT - 6}" font-size="11">1</text>'
        + f'<text x="{_WIDTH / 2 - 20:.0f}" y="{_HEIGHT - 6}" font-size="11">score</text>'
        + "</svg>"
    )
