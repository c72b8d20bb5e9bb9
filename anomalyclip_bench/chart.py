"""Bar chart of the benchmark's mean rows: one panel per dataset, metrics grouped, one bar per model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .results import MEAN, METRICS, MetricColumn

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_means"]

_PANEL_COLUMNS = 3


def plot_means(table: pd.DataFrame, path: Path, title: str = "Benchmark means") -> Path:
    """Draw the mean rows of a results table as grouped bars and save them as PNG.

    Models without any value on a dataset (every category failed) get no bar there; a dataset without values says so.

    Args:
        table: Output of :func:`~anomalyclip_bench.results.results_table`.
        path: PNG file to write.
        title: Figure title.

    Returns:
        ``path``.
    """
    from matplotlib.figure import Figure  # imported here: matplotlib is only needed for the chart

    means = table[table["category"] == MEAN]
    datasets = list(dict.fromkeys(means["dataset"])) or ["(no results)"]
    columns = min(_PANEL_COLUMNS, len(datasets))
    rows = math.ceil(len(datasets) / columns)
    figure = Figure(figsize=(6.5 * columns, 4.2 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, dataset in zip(axes, datasets, strict=False):
        _draw_panel(axis, means[means["dataset"] == dataset], dataset)
    for axis in axes[len(datasets) :]:
        axis.set_visible(False)
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def _draw_panel(axis: Axes, rows: pd.DataFrame, dataset: str) -> None:
    """Grouped bars of one dataset's means, or a note when there are none."""
    metrics = [metric for metric in METRICS if rows[metric.column].notna().any()] if len(rows) else []
    axis.set_title(dataset)
    if not metrics:
        axis.text(0.5, 0.5, "no successful runs", ha="center", va="center", transform=axis.transAxes)
        axis.set_axis_off()
        return
    models = [row for row in rows.to_dict("records") if any(_value(row, metric) > 0 for metric in metrics)]
    width = 0.8 / max(len(models), 1)
    positions = np.arange(len(metrics))
    for offset, row in enumerate(models):
        heights = [_value(row, metric) for metric in metrics]
        bars = axis.bar(positions + (offset - (len(models) - 1) / 2) * width, heights, width, label=row["model"])
        axis.bar_label(bars, labels=[f"{height:.1f}" if height else "" for height in heights], fontsize=7)
    axis.set_xticks(positions, [metric.title for metric in metrics], rotation=20)
    axis.set_ylim(0, 105)
    axis.set_ylabel("%")
    axis.legend(fontsize=8, loc="lower right")


def _value(row: dict, metric: MetricColumn) -> float:
    value = row[metric.column]
    return 0.0 if value is None or math.isnan(value) else float(value)
