"""The one folder where the package keeps what it downloads or generates once and reuses.

``$ANOMALYCLIP_CACHE`` if set, else ``$XDG_CACHE_HOME/anomalib_anomalyclip``, else
``~/.cache/anomalib_anomalyclip``. Below it, one sub-folder per kind of content:

* ``prompts/``: released and downloaded prompt checkpoints (:mod:`.weights`);
* ``synthetic/``: generated anomalous images and masks (:mod:`.data.anomaly_synthesis`);
* ``mutual/``: the state of streamed mutual scoring's pools, for resuming (:mod:`.pool_state`).

Explicit arguments (``cache_dir``, ``output_dir``) win over this folder. A persistent feature cache of prompt training
is where ``feature_cache.dir`` says; without it the cache is temporary, not kept here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

__all__ = ["CACHE_ENV_VAR", "CacheKind", "cache_dir", "cache_root"]

CACHE_ENV_VAR = "ANOMALYCLIP_CACHE"
CacheKind = Literal["prompts", "synthetic"]
_PACKAGE_FOLDER = "anomalib_anomalyclip"


def cache_root() -> Path:
    """``$ANOMALYCLIP_CACHE``, else ``$XDG_CACHE_HOME/anomalib_anomalyclip``, else ``~/.cache/anomalib_anomalyclip``."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg_cache).expanduser() if xdg_cache else Path.home() / ".cache"
    return base / _PACKAGE_FOLDER


def cache_dir(kind: CacheKind, explicit: str | os.PathLike | None = None) -> Path:
    """The folder for one kind of cached content: ``explicit`` when given, else ``cache_root() / kind``."""
    return Path(explicit).expanduser() if explicit is not None else cache_root() / kind
