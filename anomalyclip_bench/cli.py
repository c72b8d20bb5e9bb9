"""``anomalyclip-benchmark``: run a benchmark configuration and write its tables and chart.

Examples:
    anomalyclip-benchmark --config configs/benchmark/mvtec_from_visa.yaml
    anomalyclip-benchmark --config configs/benchmark/paper_datasets.yaml --datasets MPDD BTAD --dry-run
    anomalyclip-benchmark --config configs/benchmark/visa_from_mvtec.yaml --models AnomalyCLIP --categories candle

Exit status: 0 when every run succeeded, 1 when some failed (their rows say why; the tables are written either way),
2 for an invalid configuration.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from .config import BenchmarkConfig, BenchmarkConfigError, load_config
from .results import JobResult
from .runner import check_classes

__all__ = ["main", "run_benchmark"]

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_CONFIG_ERROR = 2


def run_benchmark(
    config: BenchmarkConfig, config_path: str | Path | None = None, stream: TextIO | None = None
) -> list[JobResult]:
    """Run every job of ``config`` and write ``results.csv``, ``results.md`` and ``means.png`` to its output folder.

    The tables are rewritten after every evaluation, so an interrupted run leaves the results so far.

    Args:
        config: The benchmark configuration.
        config_path: The configuration file, copied to the output folder and named in the Markdown.
        stream: Where progress lines go (default: standard error).

    Returns:
        One result per model x category.
    """
    from .report import environment_notes, write_reports
    from .runner import BenchmarkRunner

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if config_path is not None:
        shutil.copyfile(config_path, output_dir / "config.yaml")
    notes = environment_notes(config_path, config.seed)
    title = f"Benchmark: {Path(config_path).stem}" if config_path else "Benchmark"

    def report(results: list[JobResult]) -> None:
        write_reports(results, output_dir, title, notes)

    results = BenchmarkRunner(config, stream=stream, on_result=report).run()
    report(results)
    return results


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="anomalyclip-benchmark",
        description="Run a grid of anomalib models x datasets x categories; write per-category and mean tables "
        "(CSV, Markdown) and a bar chart of the means (PNG).",
    )
    parser.add_argument("--config", required=True, type=Path, help="benchmark YAML (see configs/benchmark/)")
    parser.add_argument("--output-dir", type=Path, help="override the configuration's output_dir")
    parser.add_argument("--models", nargs="+", metavar="NAME", help="run only these models (names as in the tables)")
    parser.add_argument("--datasets", nargs="+", metavar="NAME", help="run only these datasets")
    parser.add_argument("--categories", nargs="+", metavar="NAME", help="run only these categories")
    parser.add_argument("--dry-run", action="store_true", help="list the trainings and evaluations, run nothing")
    return parser.parse_args(argv)


def _selected_config(args: argparse.Namespace) -> BenchmarkConfig:
    config = load_config(args.config).select(args.models, args.datasets, args.categories)
    if args.output_dir is not None:
        config = replace(config, output_dir=args.output_dir)
    return config


def _print_plan(config: BenchmarkConfig, stream: TextIO) -> None:
    trained = config.trained_models()
    jobs = config.jobs()
    print(f"{len(trained)} training(s), {len(jobs)} evaluation(s); output in {config.output_dir}", file=stream)
    for model in trained:
        print(f"  train {model.name} on {model.train_data['class_path']}", file=stream)
    for job in jobs:
        print(f"  {job}", file=stream)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status: 0 all runs succeeded, 1 some failed, 2 invalid configuration.
    """
    args = _parse_args(argv)
    try:
        config = _selected_config(args)
        check_classes(config)
    except BenchmarkConfigError as error:
        print(f"anomalyclip-benchmark: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.dry_run:
        _print_plan(config, sys.stdout)
        return EXIT_OK
    results = run_benchmark(config, args.config)
    failed = [result for result in results if not result.ok]
    output_dir = Path(config.output_dir)
    print(f"Wrote {output_dir / 'results.csv'}, {output_dir / 'results.md'} and {output_dir / 'means.png'}")
    if failed:
        print(f"{len(failed)} of {len(results)} runs failed; see the tables and {output_dir / 'failures.log'}.")
        return EXIT_FAILURES
    return EXIT_OK
