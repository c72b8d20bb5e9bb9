"""Benchmark results: per-category rows, mean rows, CSV and Markdown.

Metrics are reported in percent, as in the AnomalyCLIP paper. A mean row averages a model's successful categories
of one dataset; its status says how many categories that is when some failed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

__all__ = [
    "FAILED",
    "MEAN",
    "METRICS",
    "OK",
    "JobResult",
    "MetricColumn",
    "metrics_from_test_output",
    "results_table",
    "write_csv",
    "write_markdown",
]

OK = "ok"
FAILED = "failed"
MEAN = "mean"


@dataclass(frozen=True)
class MetricColumn:
    """A reported metric.

    Attributes:
        column: Column name in the CSV.
        title: Column title in the Markdown table and chart.
        logged_name: Name anomalib's evaluator logs the metric under.
    """

    column: str
    title: str
    logged_name: str

    @property
    def level(self) -> str:
        """``image`` or ``pixel``."""
        return self.column.split("_", 1)[0]


METRICS: tuple[MetricColumn, ...] = (
    MetricColumn("image_AUROC", "image AUROC", "image_AUROC"),
    MetricColumn("image_AP", "image AP", "image_AUPR"),
    MetricColumn("image_F1Max", "image F1-max", "image_F1Max"),
    MetricColumn("pixel_AUROC", "pixel AUROC", "pixel_AUROC"),
    MetricColumn("pixel_AUPRO", "pixel AUPRO", "pixel_AUPRO"),
    MetricColumn("pixel_AUPRO_paper", "pixel AUPRO (paper)", "pixel_AUPRO_paper"),
    MetricColumn("pixel_F1Max", "pixel F1-max", "pixel_F1Max"),
    MetricColumn("pixel_AUPIMO", "pixel AUPIMO", "pixel_AUPIMO"),
)
"""The paper's metrics (image AUROC/AP, pixel AUROC, AUPRO as anomalib and as the paper's script compute it),
anomalib's F1-max at both levels, and anomalib's AUPIMO where a configuration asks for it (``extra_metrics``)."""

KEY_COLUMNS: tuple[str, ...] = ("model", "dataset", "category", "status")
TRAILING_COLUMNS: tuple[str, ...] = ("seconds", "error")


@dataclass(frozen=True)
class JobResult:
    """Outcome of one model on one category.

    Attributes:
        model: Model name.
        dataset: Dataset name.
        category: Category name (the dataset name for datasets without categories).
        status: :data:`OK` or :data:`FAILED`.
        metrics: Metric values in percent by :attr:`MetricColumn.column`.
        seconds: Wall-clock time of the run.
        error: Failure reason (one line); empty on success.
    """

    model: str
    dataset: str
    category: str
    status: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        """Whether the run succeeded."""
        return self.status == OK


def metrics_from_test_output(output: Mapping[str, float], levels: Iterable[str]) -> dict[str, float]:
    """Pick the reported metrics from anomalib's test output, in percent.

    Args:
        output: First element of ``Trainer.test``'s return value (logged metric name -> value in [0, 1]).
        levels: Metric levels the dataset reports.

    Returns:
        Metric values in percent by column; metrics of other levels or not logged are left out.
    """
    levels = set(levels)
    return {
        metric.column: 100.0 * float(output[metric.logged_name])
        for metric in METRICS
        if metric.level in levels and metric.logged_name in output
    }


def results_table(results: Sequence[JobResult]) -> pd.DataFrame:
    """One row per model x category, plus a mean row per model and dataset.

    Rows keep the order of first appearance of datasets and models; a model's mean row follows its categories.

    Args:
        results: Job results.

    Returns:
        Table with columns model, dataset, category, status, the metric columns, seconds and error.
    """
    rows = []
    for (_, model), group in _groups(results):
        rows.extend(_row(result) for result in group)
        rows.append(_mean_row(model, group))
    columns = [*KEY_COLUMNS, *(metric.column for metric in METRICS), *TRAILING_COLUMNS]
    return pd.DataFrame(rows, columns=columns)


def _groups(results: Sequence[JobResult]) -> list[tuple[tuple[str, str], list[JobResult]]]:
    """Results grouped by (dataset, model), groups ordered by dataset, then model, of first appearance."""
    groups: dict[tuple[str, str], list[JobResult]] = {}
    for result in results:
        groups.setdefault((result.dataset, result.model), []).append(result)
    datasets = list(dict.fromkeys(dataset for dataset, _ in groups))
    return sorted(groups.items(), key=lambda item: datasets.index(item[0][0]))


def _row(result: JobResult) -> dict[str, object]:
    return {
        "model": result.model,
        "dataset": result.dataset,
        "category": result.category,
        "status": result.status,
        **{metric.column: result.metrics.get(metric.column, math.nan) for metric in METRICS},
        "seconds": round(result.seconds, 1),
        "error": result.error,
    }


def _mean_row(model: str, group: Sequence[JobResult]) -> dict[str, object]:
    succeeded = [result for result in group if result.ok]
    failed = [result.category for result in group if not result.ok]
    if not succeeded:
        status = FAILED
    elif failed:
        status = f"{OK} {len(succeeded)}/{len(group)}"
    else:
        status = OK
    means = {metric.column: _mean([result.metrics.get(metric.column) for result in succeeded]) for metric in METRICS}
    return {
        "model": model,
        "dataset": group[0].dataset,
        "category": MEAN,
        "status": status,
        **means,
        "seconds": round(sum(result.seconds for result in group), 1),
        "error": f"failed: {', '.join(failed)}" if failed else "",
    }


def _mean(values: Iterable[float | None]) -> float:
    present = [value for value in values if value is not None and not math.isnan(value)]
    return sum(present) / len(present) if present else math.nan


def write_csv(table: pd.DataFrame, path: Path) -> Path:
    """Write the table as CSV (metrics with three decimals, empty cells for metrics not reported).

    Args:
        table: Output of :func:`results_table`.
        path: CSV file to write.

    Returns:
        ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False, float_format="%.3f")
    return path


def write_markdown(table: pd.DataFrame, path: Path, title: str, notes: Sequence[str] = ()) -> Path:
    """Write a summary of the means and one per-category table per dataset as Markdown.

    Args:
        table: Output of :func:`results_table`.
        path: Markdown file to write.
        title: Top-level heading.
        notes: Lines written below the heading (configuration, versions, ...).

    Returns:
        ``path``.
    """
    metrics = _reported_metrics(table)
    lines = [f"# {title}", "", *notes, "", "Metrics in %; means over each model's successful categories.", ""]
    means = table[table["category"] == MEAN]
    lines += ["## Means", "", *_markdown_table(means, ["dataset", "model"], metrics, bold_means=False)]
    for dataset, rows in table.groupby("dataset", sort=False):
        lines += ["", f"## {dataset}", "", *_markdown_table(rows, ["category", "model"], metrics, bold_means=True)]
    failures = table[(table["status"] == FAILED) & (table["category"] != MEAN)]
    if not failures.empty:
        lines += ["", "## Failures", ""]
        lines += [f"- {row.model} / {row.dataset} / {row.category}: {row.error}" for row in failures.itertuples()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _reported_metrics(table: pd.DataFrame) -> list[MetricColumn]:
    """Metrics with at least one value in the table."""
    return [metric for metric in METRICS if table[metric.column].notna().any()] or list(METRICS[:1])


def _markdown_table(
    rows: pd.DataFrame, keys: Sequence[str], metrics: Sequence[MetricColumn], bold_means: bool
) -> list[str]:
    header = [*keys, *(metric.title for metric in metrics), "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(keys) + "---:|" * len(metrics) + "---|"]
    for row in rows.to_dict("records"):
        bold = bold_means and row["category"] == MEAN
        cells = [_cell(row[key], bold) for key in keys]
        cells += [_cell(_percent(row[metric.column]), bold) for metric in metrics]
        cells.append(_status_cell(row))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _percent(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def _cell(value: object, bold: bool) -> str:
    text = str(value).replace("|", "\\|")
    return f"**{text}**" if bold and text != "-" else text


def _status_cell(row: Mapping[str, object]) -> str:
    status = str(row["status"])
    if status == FAILED and row["category"] != MEAN:
        reason = str(row["error"]).replace("|", "\\|")
        return f"failed: {reason[:160]}{'…' if len(reason) > 160 else ''}"
    return status
