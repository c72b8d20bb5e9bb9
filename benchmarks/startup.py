"""Start-up cost of the import hook that makes ``--model AnomalyCLIP`` work.

The hook is imported by ``anomalib_anomalyclip.pth`` in every Python process of the
environment, so it must cost nothing measurable for programs that never use anomalib.
This script times ``python -c pass`` with and without site-packages' ``.pth`` files being
processed for our hook (``-X importtime`` attributes the hook's own import time) and prints
both and their ratio.

Usage: ``python benchmarks/startup.py [--runs 30]``
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def _interpreter_start(extra: list[str], runs: int) -> float:
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, *extra, "-c", "pass"], check=True)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def _hook_import_microseconds() -> int:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, check=True
    )
    for line in result.stderr.splitlines():
        if line.rstrip().endswith("anomalib_anomalyclip_hook"):
            return int(line.split("|")[1])
    return 0


def main() -> None:
    """Print the interpreter start-up time with the hook, without site processing, and the hook's share."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    with_site = _interpreter_start([], args.runs)
    without_site = _interpreter_start(["-S"], args.runs)
    hook = _hook_import_microseconds() / 1e6
    print(f"python -c pass, median of {args.runs}: {with_site * 1e3:.1f} ms (site-packages and .pth files processed)")
    print(f"python -S -c pass (no site processing): {without_site * 1e3:.1f} ms")
    print(f"anomalib_anomalyclip_hook import (cumulative, -X importtime): {hook * 1e3:.2f} ms")
    print(f"hook share of start-up: {hook / with_site:.1%}")


if __name__ == "__main__":
    main()
