"""``python -m anomalyclip_bench``: the same as ``anomalyclip-benchmark``."""

from .cli import main

raise SystemExit(main())
