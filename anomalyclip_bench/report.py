"""Write a benchmark's tables and chart: ``results.csv``, ``results.md`` and ``means.png``."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .chart import plot_means
from .results import JobResult, results_table, write_csv, write_markdown

__all__ = ["ReportPaths", "environment_notes", "processor_name", "write_reports"]


@dataclass(frozen=True)
class ReportPaths:
    """Files written by :func:`write_reports`."""

    csv: Path
    markdown: Path
    chart: Path


def write_reports(
    results: Sequence[JobResult], output_dir: Path, title: str = "Benchmark", notes: Sequence[str] = ()
) -> ReportPaths:
    """Write the per-category table with mean rows (CSV, Markdown) and the chart of the means (PNG).

    Args:
        results: Job results.
        output_dir: Folder for the three files.
        title: Heading of the Markdown file and the chart.
        notes: Lines below the Markdown heading.

    Returns:
        The paths written.
    """
    table = results_table(results)
    return ReportPaths(
        csv=write_csv(table, output_dir / "results.csv"),
        markdown=write_markdown(table, output_dir / "results.md", title, notes),
        chart=plot_means(table, output_dir / "means.png", title),
    )


def environment_notes(config_path: str | Path | None, seed: int) -> list[str]:
    """Lines describing the run: configuration, date, versions and device."""
    import anomalib
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({processor_name()})"
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"- configuration: `{config_path}`" if config_path else "- configuration: (in memory)",
        f"- run: {when}, seed {seed}",
        f"- anomalib {anomalib.__version__}, torch {torch.__version__}, Python {platform.python_version()}",
        f"- device: {device}",
    ]
    return lines


def processor_name() -> str:
    """The CPU's model name (``platform.processor()`` is empty on most Linux systems)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"
