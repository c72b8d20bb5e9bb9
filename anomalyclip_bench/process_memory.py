"""Peak memory of the running process, shared by the benchmark scripts."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_resident_mb() -> float:
    """Peak resident memory of this process since it started, in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``. ``ru_maxrss`` is not used there because it
    survives ``exec``, so a worker started by a larger parent would report the parent's peak.
    Elsewhere ``ru_maxrss`` (kB, bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def resident_mb() -> float:
    """Resident memory of this process now (Linux ``VmRSS``), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> bool:
    """Reset this process's peak resident memory (Linux ``clear_refs``); whether it could."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
