"""Benchmark harness: a grid of anomalib models x datasets x categories with per-category and mean tables.

Run it with ``anomalyclip-benchmark --config configs/benchmark/mvtec_from_visa.yaml`` (see ``docs/benchmark.md``).
The parts: :mod:`.config` (YAML grid), :mod:`.runner` (anomalib Engine runs, train-once, failures as rows,
progress), :mod:`.results` (tables), :mod:`.chart` (bar chart) and :mod:`.report` (files). Importing this package
is cheap; anomalib and torch are imported when a run starts.
"""

from .config import BenchmarkConfig, BenchmarkConfigError, load_config, parse_config

__all__ = ["BenchmarkConfig", "BenchmarkConfigError", "load_config", "parse_config"]
