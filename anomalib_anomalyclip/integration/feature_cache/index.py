"""The files of a memory-mapped cache: ``features.bin`` and its ``index.json``.

A cache lives in ``<directory>/<digest>/``, the digest being a hash of the index header
(format, key, layout and training images; see :mod:`.key`). ``index.json`` repeats the
header and is compared on opening, so a stale or foreign cache is never read. Each
image's size and modification time are recorded too: an image changed on disk is a miss.

Integrity: a corrupt or missing index, a data file of the wrong size or a key mismatch
rebuilds the whole cache; every row carries a CRC-32 (the index's ``checksums``, -1 for a
row not filled), checked the first time a process reads the row (see :mod:`.store`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from anomalib_anomalyclip.integration.feature_cache.key import FORMAT_VERSION
from anomalib_anomalyclip.integration.feature_cache.layout import FeatureLayout

logger = logging.getLogger(__name__)

__all__ = ["DATA_NAME", "INDEX_NAME", "header_digest", "index_header", "prepare_folder", "read_index", "update_index"]

INDEX_NAME = "index.json"
DATA_NAME = "features.bin"


def index_header(key: dict[str, Any], layout: FeatureLayout, image_paths: Sequence[str]) -> dict[str, Any]:
    """What a cache folder holds features of: the index entries that must match for it to be read."""
    return {"format": FORMAT_VERSION, "key": key, "layout": asdict(layout), "image_paths": list(image_paths)}


def header_digest(header: dict[str, Any]) -> str:
    """The folder name of the cache described by ``header``."""
    return hashlib.blake2b(json.dumps(header, sort_keys=True).encode(), digest_size=10).hexdigest()


def _file_signatures(paths: Sequence[str]) -> list[list[int]]:
    """Size and modification time (ns) of every image; -1 where it cannot be read."""
    signatures = []
    for path in paths:
        try:
            status = os.stat(path)
            signatures.append([status.st_size, status.st_mtime_ns])
        except OSError:
            signatures.append([-1, -1])
    return signatures


def prepare_folder(folder: Path, header: dict[str, Any], layout: FeatureLayout, paths: Sequence[str]) -> None:
    """Validate an existing cache (dropping rows of changed images) or create an empty one."""
    signatures = _file_signatures(paths)
    index = read_index(folder, header, layout)
    if index is None:
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / DATA_NAME).open("wb") as file:
            file.truncate(len(paths) * layout.row_bytes)
        index = {**header, "signatures": signatures, "checksums": [-1] * len(paths)}
    else:
        changed = [old != new for old, new in zip(index["signatures"], signatures, strict=True)]
        index["checksums"] = [
            -1 if stale else checksum for stale, checksum in zip(changed, index["checksums"], strict=True)
        ]
        index["signatures"] = signatures
        reused = sum(checksum >= 0 for checksum in index["checksums"])
        logger.info("Feature cache: reusing %d of %d cached images from %s.", reused, len(paths), folder)
    _write_index(folder, index)


def read_index(folder: Path, header: dict[str, Any], layout: FeatureLayout) -> dict[str, Any] | None:
    """The index if it matches ``header`` and the data file, else ``None`` (the reason is logged)."""
    if not (folder / INDEX_NAME).exists():
        return None
    problem, index = _index_problem(folder, header, layout)
    if problem:
        logger.warning("Feature cache in %s is unusable (%s); rebuilding it.", folder, problem)
        return None
    return index


def _index_problem(folder: Path, header: dict[str, Any], layout: FeatureLayout) -> tuple[str, dict[str, Any]]:
    try:
        index = json.loads((folder / INDEX_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"unreadable index: {error}", {}
    if not isinstance(index, dict) or any(index.get(name) != value for name, value in header.items()):
        return "its index was written for other features or images", {}
    count = len(header["image_paths"])
    if any(len(index.get(name) or ()) != count for name in ("signatures", "checksums")):
        return "its index is incomplete", {}
    data = folder / DATA_NAME
    expected = count * layout.row_bytes
    if not data.is_file() or data.stat().st_size != expected:
        size = data.stat().st_size if data.is_file() else "missing"
        return f"{DATA_NAME} has size {size}, expected {expected}", {}
    return "", index


def _write_index(folder: Path, index: dict[str, Any]) -> None:
    """Replace the index atomically (a crash leaves the old or the new one, never half of one)."""
    temporary = folder / f"{INDEX_NAME}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(index))
    os.replace(temporary, folder / INDEX_NAME)


def update_index(folder: Path, checksums: np.ndarray) -> None:
    """Record the rows' checksums (-1: not filled) in the index of ``folder``."""
    index = json.loads((folder / INDEX_NAME).read_text())
    index["checksums"] = [int(value) for value in checksums]
    _write_index(folder, index)
