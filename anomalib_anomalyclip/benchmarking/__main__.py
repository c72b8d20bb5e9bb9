"""``python -m anomalib_anomalyclip.benchmarking``: the same as ``anomalyclip-benchmark``."""

from .cli import main

raise SystemExit(main())
