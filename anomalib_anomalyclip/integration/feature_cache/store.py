"""The cache itself: per-image rows of visual features, in memory or memory-mapped, filled on first sight.

Prompt training learns about 43 K prompt numbers while the visual encoder is frozen and
sees the same training images every epoch. :class:`FeatureCache` keeps, per training
image, exactly what :class:`~anomalib_anomalyclip.method.dpam.DualPathVisualEncoder` returns
(one row, see :mod:`.layout`), so that only the first epoch runs the visual encoder and
later epochs run the text side and the loss alone.

Filling: lazily. An image whose features are not cached yet (a *miss*) goes through the
visual encoder with the rest of the batch's misses, under ``torch.no_grad``, and is
stored; a *hit* is read back. Images are identified by their path (``batch.image_path``),
so shuffled batches are served sample by sample.

Storage: one row per image, allocated for the whole training set up front, in memory or
in a memory-mapped file ``features.bin`` next to an ``index.json`` under
``<directory>/<digest>/`` (see :mod:`.index`). A cache in a folder given by the user
persists and is reused by later runs with the same key; a temporary one is removed when
it is closed.

Integrity: every row carries a CRC-32, checked the first time a process reads the row,
and a row that fails it is recomputed and rewritten, never used. Processes that share a
memory-mapped cache exchange what they wrote at the end of every epoch (see :mod:`.sync`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalib_anomalyclip.integration.feature_cache.index import (
    DATA_NAME,
    header_digest,
    index_header,
    prepare_folder,
    read_index,
    update_index,
)
from anomalib_anomalyclip.integration.feature_cache.layout import FeatureLayout
from anomalib_anomalyclip.integration.feature_cache.sync import RankSync

logger = logging.getLogger(__name__)

__all__ = ["CacheStats", "FeatureCache", "VisualEncoder", "open_feature_cache"]

VisualEncoder = Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]


@dataclass(frozen=True)
class CacheStats:
    """What one epoch did with the cache (summed over the processes that share it).

    Attributes:
        epoch: 1 for the first epoch of the run.
        hits: images served from the cache.
        misses: images that went through the visual encoder.
        recomputed: of the misses, rows that were cached but failed their checksum.
        filled: images cached at the end of the epoch.
        capacity: training images.
    """

    epoch: int
    hits: int
    misses: int
    recomputed: int
    filled: int
    capacity: int


@dataclass
class _Storage:
    """The rows and where they live: ``memmap`` and ``directory`` are ``None`` for a cache in memory."""

    rows: torch.Tensor
    memmap: np.memmap | None = None
    directory: Path | None = None
    temporary: bool = False


@dataclass
class _Counters:
    hits: int = 0
    misses: int = 0
    recomputed: int = 0
    epochs: int = 0
    history: list[CacheStats] = field(default_factory=list)


class FeatureCache:
    """Per-image visual features of the training set, filled on first sight.

    Build it with :func:`open_feature_cache` (or :func:`~.lightning.training_feature_cache` from a
    Lightning trainer); call :meth:`features` in every training step, :meth:`end_epoch`
    after every epoch (or :meth:`begin_epoch` before it) and :meth:`close` at the end.

    Args:
        layout: row layout.
        image_paths: the training images, sorted; row ``i`` belongs to ``image_paths[i]``.
        storage: the rows.
        checksums: per row the CRC-32 of its bytes, -1 where not filled.
        sync: the processes sharing the storage.
        image_size: (height, width) the features were computed at; other inputs are refused.
        pre_processing: the ``repr`` of every transform between file and encoder (the key's
            ``pre_processing``): other data can share the cache only when its transforms match.
    """

    def __init__(
        self,
        layout: FeatureLayout,
        image_paths: Sequence[str],
        storage: _Storage,
        checksums: np.ndarray,
        sync: RankSync,
        image_size: Sequence[int] | None = None,
        pre_processing: Sequence[str] | None = None,
    ) -> None:
        self.layout = layout
        self.image_size = tuple(image_size) if image_size else None
        self.pre_processing = list(pre_processing) if pre_processing is not None else None
        self.image_paths = list(image_paths)
        self._row_of = {path: row for row, path in enumerate(self.image_paths)}
        self._storage: _Storage | None = storage
        self._directory = storage.directory
        self._checksums = checksums.astype(np.int64)
        self._verified = np.zeros(len(self.image_paths), dtype=bool)
        self._written = np.full(len(self.image_paths), -1, dtype=np.int64)
        self._sync = sync
        self._counters = _Counters()
        self._in_epoch = False
        self.validation_refusal_logged = False

    @property
    def capacity(self) -> int:
        """Number of training images."""
        return len(self.image_paths)

    @property
    def filled(self) -> int:
        """Images whose features are cached (as far as this process knows)."""
        return int((self._checksums >= 0).sum())

    @property
    def directory(self) -> Path | None:
        """Folder of the memory-mapped file, ``None`` in memory."""
        return self._directory

    @property
    def history(self) -> list[CacheStats]:
        """Statistics of every finished epoch."""
        return list(self._counters.history)

    def features(
        self, images: torch.Tensor, image_paths: Sequence[str], encoder: VisualEncoder, record: bool = True
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The encoder's outputs for a batch: cached rows where available, computed (and stored) otherwise.

        Args:
            images: (B, 3, H, W) pre-processed images.
            image_paths: their paths, as in ``batch.image_path``.
            encoder: the visual encoder, run under ``torch.no_grad`` on the misses only.
            record: store what was computed and count the hits and misses in the epoch's
                figures. Validation reads without recording: with several processes, a row
                that two of them write in one epoch would be dropped.

        Returns:
            The global embedding (B, D) and per feature layer the patch tokens (B, N, D),
            float32 on the images' device.
        """
        self._check_size(images)
        rows = np.array([self._row_of.get(str(path), -1) for path in image_paths], dtype=np.int64)
        out = torch.empty((len(rows), self.layout.row_numel), dtype=torch.float32, device=images.device)
        served = self._read(rows, out)
        missing = np.flatnonzero(~served)
        if missing.size:
            positions = torch.from_numpy(missing).to(images.device)
            selection = images if missing.size == len(rows) else images[positions]
            with torch.no_grad():
                computed = self.layout.pack(*encoder(selection))
            out[positions] = computed.to(out.dtype)
            if record:
                self._write(rows[missing], computed)
        if record:
            self._counters.hits += int(served.sum())
            self._counters.misses += int(missing.size)
        return self.layout.unpack(out)

    def begin_epoch(self) -> None:
        """Finish the previous epoch, if one is open (see :meth:`end_epoch`), and open a new one.

        Lightning integration calls this from ``on_train_epoch_start`` rather than calling
        :meth:`end_epoch` from ``on_train_epoch_end``: in that hook rank 0's progress bar may
        already wait in a sync of the logged metrics that the other ranks only join after
        the hook, so a collective of ours there would deadlock.
        """
        if self._in_epoch:
            self.end_epoch()
        self._in_epoch = True

    def end_epoch(self) -> CacheStats:
        """Share the rows written this epoch with the other processes, save the index, log the epoch.

        A collective operation: every process sharing the cache must call it.
        """
        self._in_epoch = False
        storage = self._require_storage()
        if storage.memmap is not None:
            storage.memmap.flush()
        written = torch.from_numpy(self._written)
        counts = self._sync.sum((written >= 0).long())
        checksums = self._sync.sum(written.clamp(min=0))
        totals = self._sync.sum(torch.tensor([self._counters.hits, self._counters.misses, self._counters.recomputed]))
        self._adopt(counts.numpy(), checksums.numpy())
        if storage.directory is not None and self._sync.is_main:
            update_index(storage.directory, self._checksums)
        return self._log_epoch(*(int(value) for value in totals))

    def close(self) -> None:
        """Finish an open epoch, release the rows, remove a temporary cache folder (once all processes are done)."""
        if self._in_epoch and self._storage is not None:
            self.end_epoch()
        storage, self._storage = self._storage, None
        if storage is None:
            return
        if storage.memmap is not None:
            storage.memmap.flush()
        remove = storage.directory if storage.temporary else None
        del storage  # unmap before removing the file
        if remove is not None:
            self._sync.barrier()
            if self._sync.is_main:
                shutil.rmtree(remove, ignore_errors=True)
                _remove_if_empty(remove.parent)
        self._sync.release()

    def _check_size(self, images: torch.Tensor) -> None:
        size = tuple(images.shape[-2:])
        if self.image_size is not None and size != self.image_size:
            raise ValueError(
                f"The feature cache holds features of {self.image_size[0]}x{self.image_size[1]} inputs (the model's "
                f"image_size), but the training batch is {size[0]}x{size[1]}. Make the pre-processor resize to "
                "image_size, or turn the cache off with --model.feature_cache false."
            )

    def _require_storage(self) -> _Storage:
        if self._storage is None:
            raise RuntimeError("The feature cache was closed.")
        return self._storage

    def _read(self, rows: np.ndarray, out: torch.Tensor) -> np.ndarray:
        """Copy the cached rows into ``out``; returns which batch positions were served."""
        served = rows >= 0
        served[served] = self._checksums[rows[served]] >= 0
        positions = np.flatnonzero(served)
        if not positions.size:
            return served
        values = self._require_storage().rows[torch.from_numpy(rows[positions])]
        corrupt = self._verify(rows[positions], values)
        if corrupt.any():
            served[positions[corrupt]] = False
            positions, values = positions[~corrupt], values[torch.from_numpy(~corrupt)]
        out[torch.from_numpy(positions).to(out.device)] = values.to(out.device, out.dtype)
        return served

    def _verify(self, rows: np.ndarray, values: torch.Tensor) -> np.ndarray:
        """Check the CRC of rows this process has not read before; failing rows are dropped."""
        corrupt = np.zeros(len(rows), dtype=bool)
        for index in np.flatnonzero(~self._verified[rows]):
            row = rows[index]
            if _crc(values[index]) == self._checksums[row]:
                self._verified[row] = True
            else:
                corrupt[index] = True
                self._checksums[row] = -1
        if corrupt.any():
            self._counters.recomputed += int(corrupt.sum())
            logger.warning(
                "Feature cache: %d cached row(s) failed their checksum; recomputing them.", int(corrupt.sum())
            )
        return corrupt

    def _write(self, rows: np.ndarray, computed: torch.Tensor) -> None:
        known = rows >= 0
        if not known.any():
            return
        values = computed[torch.from_numpy(known).to(computed.device)].detach().to("cpu", self.layout.dtype)
        rows = rows[known]
        self._require_storage().rows[torch.from_numpy(rows)] = values
        for row, value in zip(rows, values, strict=True):
            checksum = _crc(value)
            self._written[row] = checksum
            self._checksums[row] = checksum
            self._verified[row] = True

    def _adopt(self, counts: np.ndarray, checksums: np.ndarray) -> None:
        """Rows written by exactly one process become available everywhere; rows written twice are dropped."""
        mine = self._written >= 0
        single, repeated = counts == 1, counts > 1
        self._checksums[single] = checksums[single]
        self._verified[single & ~mine] = False
        self._checksums[repeated] = -1
        self._verified[repeated] = False
        self._written[:] = -1

    def _log_epoch(self, hits: int, misses: int, recomputed: int) -> CacheStats:
        counters = self._counters
        counters.epochs += 1
        stats = CacheStats(counters.epochs, hits, misses, recomputed, self.filled, self.capacity)
        counters.history.append(stats)
        counters.hits = counters.misses = counters.recomputed = 0
        recomputed_text = f" ({recomputed} after a failed checksum)" if recomputed else ""
        if not self._sync.is_main:  # the numbers are totals over the processes: rank 0 says them
            return stats
        logger.info(
            "Feature cache, epoch %d: %d hits, %d misses%s; %d/%d training images cached.",
            stats.epoch,
            hits,
            misses,
            recomputed_text,
            stats.filled,
            stats.capacity,
            extra={"feature_cache_stats": stats},
        )
        return stats


def _crc(row: torch.Tensor) -> int:
    return zlib.crc32(memoryview(row.contiguous().view(torch.uint8).numpy()))


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty, or already gone
        folder.rmdir()


def open_feature_cache(
    key: dict[str, Any],
    layout: FeatureLayout,
    image_paths: Sequence[str],
    directory: str | Path | None = None,
    sync: RankSync | None = None,
    temporary: bool = False,
) -> FeatureCache:
    """Open the cache for ``key`` and these images, creating or rebuilding it as needed.

    Args:
        key: what the features depend on (see :func:`cache_key`); a cache in memory, which
            no other run can meet, needs only :func:`input_key`.
        layout: row layout.
        image_paths: the training images (any order; duplicates are ignored).
        directory: parent folder of a memory-mapped cache; ``None`` keeps it in memory.
        sync: processes sharing a memory-mapped cache; ``None`` for a single process.
        temporary: remove the cache's folder when it is closed.

    Returns:
        The cache. Rows of a valid existing cache whose image is unchanged are reused.
    """
    sync = sync or RankSync()
    paths = sorted({str(path) for path in image_paths})
    if not paths:
        raise ValueError("A feature cache needs at least one training image.")
    if directory is None:
        rows = torch.empty((len(paths), layout.row_numel), dtype=layout.dtype)
        storage, checksums = _Storage(rows), np.full(len(paths), -1)
        return FeatureCache(layout, paths, storage, checksums, sync, key.get("image_size"), key.get("pre_processing"))
    header = index_header(key, layout, paths)
    folder = Path(directory) / header_digest(header)
    if sync.is_main:
        prepare_folder(folder, header, layout, paths)
    sync.barrier()
    index = read_index(folder, header, layout)
    if index is None:
        raise RuntimeError(f"The feature cache index in {folder} vanished or changed while opening it.")
    memmap = np.memmap(folder / DATA_NAME, dtype=_numpy_dtype(layout), mode="r+", shape=(len(paths), layout.row_numel))
    storage = _Storage(torch.from_numpy(memmap), memmap, folder, temporary)
    checksums = np.asarray(index["checksums"], dtype=np.int64)
    return FeatureCache(layout, paths, storage, checksums, sync, key.get("image_size"), key.get("pre_processing"))


def _numpy_dtype(layout: FeatureLayout) -> np.dtype:
    return np.dtype(str(layout.dtype).removeprefix("torch."))
