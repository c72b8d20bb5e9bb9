"""On-disk state of streamed mutual scoring: what each scored subset of a pool left behind, so that a run resumes.

A pool's state is a folder ``<cache root>/mutual/<files digest>-<settings digest>/`` (:func:`state_root`, below the
package cache of :mod:`.cache`): the first digest is of the pool's image files (paths, sizes, modification times),
the second of everything the scores depend on (the prompts' text features, the few-shot references, the mutual
scoring settings, the fusion, the input transform and the model's configuration). ``manifest.json`` records both.
When a subset is scored, one file per image holds its prompt map (full resolution, float32) and its mutual patch
scores (token grid), and then ``subset_<i>.pt`` holds the small values the pool-wide fusion needs
(:class:`SubsetSummary`); that file is written last, atomically, and marks the subset finished.

Another run of the same images and settings finds the finished subsets and does not encode them again; other images
or settings give another folder, so stale state is never reused (a warning names the folder of the same images'
state from other settings, which is left alone). A ``predict`` run removes its pools' state when it has written its
predictions; any state folder untouched for :data:`KEEP_DAYS` days is removed when a mutual-scoring run starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anomalib_anomalyclip.cache import cache_root
from anomalib_anomalyclip.method.mutual import MutualScoringError

__all__ = ["KEEP_DAYS", "PoolState", "PoolStateError", "SubsetSummary", "state_root"]

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
KEEP_DAYS = 7
MANIFEST = "manifest.json"


class PoolStateError(MutualScoringError):
    """A pool's state folder does not belong to the images and settings of this run."""


@dataclass
class SubsetSummary:
    """What the pool-wide fusion needs of one scored subset (a few numbers per image).

    Attributes:
        paths: the subset's images, in the pool's order.
        prompt_scores: (n,) the prompts' image scores.
        mutual_scores: (n,) maxima of the mutual maps (before RsCIN).
        class_embeddings: (n, D) class embeddings (for RsCIN).
        prompt_map_range: (2,) minimum and maximum of the prompts' maps over the subset's pixels.
        mutual_map_range: (2,) minimum and maximum of the mutual maps over the subset's pixels.
    """

    paths: list[str]
    prompt_scores: torch.Tensor
    mutual_scores: torch.Tensor
    class_embeddings: torch.Tensor
    prompt_map_range: torch.Tensor
    mutual_map_range: torch.Tensor


def state_root() -> Path:
    """``<cache root>/mutual``: where the pools' state folders live."""
    return cache_root() / "mutual"


def digest(value: Any) -> str:
    """A short hex digest of a JSON-serialisable value (keys sorted)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def file_stamps(paths: Sequence[str]) -> list[tuple[str, int, int]]:
    """``(path, size, modification time in ns)`` of each file (``-1`` for a file that cannot be read)."""
    stamps = []
    for path in paths:
        try:
            stat = Path(path).stat()
            stamps.append((str(path), stat.st_size, stat.st_mtime_ns))
        except OSError:
            stamps.append((str(path), -1, -1))
    return stamps


class PoolState:
    """The state folder of one pool (see the module's description).

    Args:
        folder: the folder (created when missing).
        manifest: what the state depends on: ``files`` and ``settings`` digests and a readable description.

    Raises:
        PoolStateError: the folder holds a manifest of other files or settings.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = folder
        self.manifest = manifest
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / MANIFEST
        if path.exists():
            self._check_manifest(path)
        else:
            _write_atomically(path, lambda target: target.write_text(json.dumps(manifest, indent=1, default=str)))
        os.utime(folder)  # used now: not pruned

    @classmethod
    def for_pool(cls, paths: Sequence[str], settings: dict[str, Any], root: Path | None = None) -> PoolState:
        """The state of the pool of ``paths`` (sorted) scored with ``settings``; warns of other settings' state."""
        root = root or state_root()
        files_key = digest([STATE_FORMAT, file_stamps(paths)])
        settings_key = digest([STATE_FORMAT, settings])
        folder = root / f"{files_key}-{settings_key}"
        for other in sorted(root.glob(f"{files_key}-*")):
            if other != folder:
                logger.warning(
                    "Mutual scoring: %s holds state of these %d images from other settings; it is not used (and left "
                    "alone; state untouched for %d days is removed).", other, len(paths), KEEP_DAYS,
                )  # fmt: skip
        manifest = {"format": STATE_FORMAT, "files": files_key, "settings": settings_key, "images": len(paths),
                    "described": settings}  # fmt: skip
        return cls(folder, manifest)

    def is_finished(self, index: int) -> bool:
        """Whether subset ``index`` was scored (by this run or an earlier one)."""
        return self._summary_path(index).exists()

    def finished(self, index: int) -> SubsetSummary | None:
        """The summary of subset ``index`` when it was scored (by this run or an earlier one), else ``None``."""
        path = self._summary_path(index)
        if not path.exists():
            return None
        return SubsetSummary(**torch.load(path, map_location="cpu", weights_only=True))

    def save_subset(
        self, index: int, summary: SubsetSummary, prompt_maps: torch.Tensor, patch_scores: torch.Tensor
    ) -> None:
        """Write the subset's per-image maps, then its summary (which marks it finished)."""
        for row, (prompt_map, patches) in enumerate(zip(prompt_maps, patch_scores, strict=True)):
            maps = {"prompt_map": prompt_map.cpu().clone(), "patch_scores": patches.cpu().clone()}
            _write_atomically(self._image_path(index, row), lambda target, maps=maps: torch.save(maps, target))
        values = dict(summary.__dict__)
        _write_atomically(self._summary_path(index), lambda target: torch.save(values, target))

    def image_maps(self, index: int, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt map (1, H, W) and the mutual patch scores (h, w) of image ``row`` of subset ``index``."""
        maps = torch.load(self._image_path(index, row), map_location="cpu", weights_only=True)
        return maps["prompt_map"], maps["patch_scores"]

    def discard(self) -> None:
        """Remove the folder."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def _summary_path(self, index: int) -> Path:
        return self.folder / f"subset_{index:05d}.pt"

    def _image_path(self, index: int, row: int) -> Path:
        return self.folder / f"subset_{index:05d}_image_{row:05d}.pt"

    def _check_manifest(self, path: Path) -> None:
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = None
        keys = ("format", "files", "settings")
        if isinstance(stored, dict) and all(stored.get(key) == self.manifest[key] for key in keys):
            return
        raise PoolStateError(
            f"The mutual-scoring state folder {self.folder} was written for other images or settings (its {MANIFEST} "
            "does not match this run); nothing in it was used or changed. Remove that folder to score these images "
            "again."
        )


def prune(root: Path | None = None, keep_days: float = KEEP_DAYS) -> None:
    """Remove state folders below ``root`` untouched for ``keep_days`` days."""
    root = root or state_root()
    if not root.is_dir():
        return
    oldest = time.time() - keep_days * 86400
    for folder in root.iterdir():
        if folder.is_dir() and folder.stat().st_mtime < oldest:
            logger.info("Mutual scoring: removing state untouched for %s days: %s", keep_days, folder)
            shutil.rmtree(folder, ignore_errors=True)


def _write_atomically(path: Path, write: Any) -> None:
    """``write(temporary path)``, then rename it to ``path`` (a killed run leaves no half-written file)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)
