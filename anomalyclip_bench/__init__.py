"""Benchmarks and studies of AnomalyCLIP, shipped beside the model package ``anomalib_anomalyclip``.

The model package never imports this one. The benchmark harness runs a grid of anomalib models x datasets x
categories with per-category and mean tables: ``anomalyclip-benchmark --config configs/benchmark/mvtec_from_visa.yaml``
or ``python -m anomalyclip_bench`` (see ``docs/benchmark.md``). Its parts: :mod:`.config` (YAML grid, read by
jsonargparse), :mod:`.runner` (anomalib Engine runs, train-once, failures as rows, progress), :mod:`.results`
(tables), :mod:`.chart` (bar chart) and :mod:`.report` (files). Importing this package is cheap; anomalib and torch
are imported when a run starts.

The scripts in ``benchmarks/`` use the rest: :mod:`.few_shot_study` and :mod:`.synthetic_study` (the documentation's
few-shot and synthetic-anomaly numbers, on generated data), :mod:`.features` (the studies' access to the model's
features and prompts), :mod:`.throughput` (FLOPs and utilisation), :mod:`.process_memory` (peak memory) and
:mod:`.reference_anomalyclip` (the reference implementation, from a local checkout).
"""

from .config import BenchmarkConfig, BenchmarkConfigError, load_config, parse_config

__all__ = ["BenchmarkConfig", "BenchmarkConfigError", "load_config", "parse_config"]
