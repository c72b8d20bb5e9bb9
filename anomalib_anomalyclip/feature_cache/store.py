"""Cache of the frozen visual features for prompt training.

Prompt training learns about 43 K prompt numbers while the visual encoder is frozen and
sees the same training images every epoch. :class:`FeatureCache` keeps, per training
image, exactly what :class:`~anomalib_anomalyclip.dpam.DualPathVisualEncoder` returns
(the global embedding and the projected patch tokens of every feature layer), so that
only the first epoch runs the visual encoder and later epochs run the text side and the
loss alone.

Filling: lazily. An image whose features are not cached yet (a *miss*) goes through the
visual encoder with the rest of the batch's misses, under ``torch.no_grad``, and is
stored; a *hit* is read back. Images are identified by their path (``batch.image_path``),
so shuffled batches are served sample by sample.

Storage: one row of ``D * (1 + layers * patches)`` numbers per image, allocated for
the whole training set up front (the size is logged before filling). In memory when it
fits (single process, no ``directory``, at most half of the available memory), else a
memory-mapped file ``features.bin`` next to an ``index.json`` under
``<directory>/<digest>/``. A cache in a directory given by the user persists and is
reused by later runs with the same key; the fallback directory below the trainer's
``default_root_dir`` is removed at the end of training.

Storage precision: float32 by default, so a read returns the features that the first
epoch computed, bit for bit. An uncached run instead recomputes them every epoch, in
batches of another composition, which may round differently in the last bit; that is the
only difference between cached and uncached training. On the tiny test CLIP the learned
prompts are identical after 15 epochs. Prompt training on random ViT-B-16 weights is so
sensitive to rounding (Adam turns near-zero gradients into full steps) that an uncached
run with 2 instead of 1 torch thread differs from the uncached run as much as the cached
run does (``benchmarks/train.py --rounding-floor``). float16 halves the size but rounds
every feature (relative error up to 2**-11): on the tiny CLIP the prompts after 15 epochs
then differ by up to 3e-5 (7e-4 of what training changed them by), more than the 1e-5
that cached training is meant to keep.

Key: the directory name is a digest of everything that changes the features: a hash of
the visual encoder's weights, the input size, the DPAM kind and start layer, the feature
layers, the pre-processing and dataset transforms (their ``repr``), the trainer's
precision, the device type, the torch version, the storage layout and the list of
training images. ``index.json`` repeats the full key and is compared on opening, so a
stale or foreign cache is never read. Each image's size and modification time are
recorded too: an image changed on disk is a miss.

Integrity: a corrupt or missing index, a data file of the wrong size or a key mismatch
rebuilds the whole cache; every row carries a CRC-32, checked the first time a process
reads the row, and a row that fails it is recomputed and rewritten, never used.

Multi-process DDP on one machine: the ranks share one memory-mapped file. Rows are
assigned by the sorted image list, the same on every rank; a rank that misses an image
(with a shuffling sampler a rank sees different images every epoch) computes and writes
its row. After each epoch (at the start of the next one, over a gloo process group of
the cache's own) the ranks sum which rows they wrote and their checksums: a row written
by exactly one rank becomes available to all ranks, a row written by two (the sampler's
padding repeats a few images) is dropped and recomputed later. The ranks use rank 0's
folder. With several nodes, or without torch.distributed, every rank keeps a private
cache.

The cache assumes that an image path always yields the same pixels: random training
augmentations (datamodule or pre-processor) and synthetic anomalies made anew every epoch
(a dataset's ``random_transforms``) switch it off, with a log message.

Validation during ``fit``: :func:`validation_feature_cache` lets the validation pass between
epochs read the cache when the validation images are pre-processed exactly as the training
images (AuxiliaryDataModule validates on the training images by default). Validation only
reads: images the cache does not hold are encoded and not stored, and its reads are not
counted in the epoch's hits and misses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dpam import DualPathVisualEncoder

logger = logging.getLogger(__name__)

__all__ = [
    "STORAGE_DTYPES",
    "CacheStats",
    "FeatureCache",
    "FeatureLayout",
    "RankSync",
    "cache_key",
    "check_storage_dtype",
    "input_key",
    "nondeterministic_transforms",
    "open_feature_cache",
    "training_feature_cache",
    "validation_feature_cache",
    "visual_features",
    "weights_digest",
]

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
DATA_NAME = "features.bin"
MEMORY_FRACTION = 0.5
STORAGE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
DETERMINISTIC_TRANSFORMS = frozenset(
    {
        "CenterCrop",
        "Compose",
        "ConvertImageDtype",
        "ExportableCenterCrop",
        "Grayscale",
        "Identity",
        "Normalize",
        "Pad",
        "ReferenceResize",
        "Resize",
        "ToDtype",
        "ToImage",
        "ToPureTensor",
    }
)

VisualEncoder = Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]


# --------------------------------------------------------------------------------------------------------------------
# Layout, key and process synchronisation
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureLayout:
    """How one image's visual features are laid out in a cache row.

    A row is the global embedding (D) followed by each feature layer's patch tokens
    (patches x D), flattened.

    Attributes:
        embed_dim: D, the size of the global embedding and of every patch token.
        num_layers: number of feature layers.
        num_patches: patch tokens per layer (rows x columns of the patch grid).
        dtype_name: storage precision, a key of :data:`STORAGE_DTYPES`.
    """

    embed_dim: int
    num_layers: int
    num_patches: int
    dtype_name: str = "float32"

    def __post_init__(self) -> None:
        check_storage_dtype(self.dtype_name)

    @classmethod
    def for_encoder(
        cls, encoder: DualPathVisualEncoder, image_size: Sequence[int], dtype_name: str = "float32"
    ) -> FeatureLayout:
        """The layout of ``encoder``'s outputs for inputs of ``image_size`` (height, width)."""
        rows, columns = encoder.grid_size(tuple(image_size))
        return cls(encoder.output_dim, len(encoder.feature_layers), rows * columns, dtype_name)

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype."""
        return STORAGE_DTYPES[self.dtype_name]

    @property
    def row_numel(self) -> int:
        """Numbers per image."""
        return self.embed_dim * (1 + self.num_layers * self.num_patches)

    @property
    def row_bytes(self) -> int:
        """Bytes per image."""
        return self.row_numel * self.dtype.itemsize

    def pack(self, global_embedding: torch.Tensor, patch_tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """Rows (B, row_numel) from the encoder's outputs (B, D) and per layer (B, N, D)."""
        return torch.cat([global_embedding, *(tokens.flatten(1) for tokens in patch_tokens)], dim=1)

    def unpack(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The encoder's outputs, the global embedding (B, D) and per layer (B, N, D), from rows."""
        patches = rows[:, self.embed_dim :].unflatten(1, (self.num_layers, self.num_patches, self.embed_dim))
        return rows[:, : self.embed_dim], [patches[:, layer] for layer in range(self.num_layers)]

    def describe(self, count: int) -> str:
        """Human-readable size of ``count`` rows, e.g. ``40 images x 4.2 MB (...) = 168.3 MB``."""
        layers = f"{self.num_layers} layer{'s' if self.num_layers != 1 else ''}"
        return (
            f"{count} images x {_size_text(self.row_bytes)} (global {self.embed_dim} + {layers} x "
            f"{self.num_patches} patches x {self.embed_dim}, {self.dtype_name}) = {_size_text(count * self.row_bytes)}"
        )


def check_storage_dtype(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a storage precision of :data:`STORAGE_DTYPES`."""
    if name not in STORAGE_DTYPES:
        raise ValueError(f"feature_cache_dtype must be one of {sorted(STORAGE_DTYPES)}, got {name!r}.")


def _size_text(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def weights_digest(module: torch.nn.Module) -> str:
    """BLAKE2 hash of a module's parameters and buffers (names, dtypes, shapes and bytes).

    About 2 s for ViT-L/14's 300 M visual parameters on one CPU core.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def cache_key(
    encoder: torch.nn.Module,
    image_size: Sequence[int],
    transforms: Sequence[object] = (),
    precision: str = "32-true",
    device_type: str = "cpu",
) -> dict[str, Any]:
    """Everything that changes the visual features of an image path, as plain JSON data.

    Args:
        encoder: the :class:`~anomalib_anomalyclip.dpam.DualPathVisualEncoder`.
        image_size: (height, width) of the encoder's input.
        transforms: every transform between the image file and the encoder (dataset
            transforms and the pre-processor's); compared by their ``repr``.
        precision: the trainer's precision (autocast changes the features).
        device_type: where the features are computed (kernels round differently).
    """
    return {
        "format": FORMAT_VERSION,
        "visual_weights": weights_digest(encoder),
        **input_key(image_size, transforms),
        "dpam_kind": encoder.dpam_kind.value,
        "dpam_start_layer": encoder.dpam_start_layer,
        "feature_layers": list(encoder.feature_layers),
        "precision": str(precision),
        "device": device_type,
        "torch": torch.__version__,
    }


def input_key(image_size: Sequence[int], transforms: Sequence[object] = ()) -> dict[str, Any]:
    """The part of :func:`cache_key` that other data sharing the cache is checked against (size, pre-processing)."""
    return {
        "image_size": [int(side) for side in image_size],
        "pre_processing": [repr(transform) for transform in transforms],
    }


def nondeterministic_transforms(transform: object) -> list[str]:
    """Names of the transforms in ``transform`` (walking ``Compose``) not known to be deterministic."""
    names = (type(item).__name__ for item in _walk_transforms(transform))
    return [name for name in names if name not in DETERMINISTIC_TRANSFORMS]


def _walk_transforms(transform: object) -> Iterator[object]:
    if transform is None:
        return
    yield transform
    for child in getattr(transform, "transforms", ()) or ():
        yield from _walk_transforms(child)


def _nothing() -> None:
    """Barrier of a single process."""


def _same(value: Any) -> Any:
    """Sum over, or rank 0's value of, a single process."""
    return value


@dataclass(frozen=True)
class RankSync:
    """The processes that share one cache, and how they synchronise.

    Attributes:
        rank: this process's rank among those sharing the cache.
        world_size: number of processes sharing the cache.
        barrier: waits for all of them.
        sum: element-wise sum of a CPU tensor over all of them (returns a CPU tensor).
        share: rank 0's value of a picklable object.
        release: frees the synchronisation's resources (called once, by every process).
    """

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = _nothing
    sum: Callable[[torch.Tensor], torch.Tensor] = _same
    share: Callable[[Any], Any] = _same
    release: Callable[[], None] = _nothing

    @property
    def is_main(self) -> bool:
        """Whether this process writes the shared index."""
        return self.rank == 0


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


# --------------------------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------------------------


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

    Build it with :func:`open_feature_cache` (or :func:`training_feature_cache` from a
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
            _update_index(storage.directory, self._checksums)
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


# --------------------------------------------------------------------------------------------------------------------
# Opening: memory or a memory-mapped file with its index
# --------------------------------------------------------------------------------------------------------------------


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
    header = {"format": FORMAT_VERSION, "key": key, "layout": asdict(layout), "image_paths": paths}
    folder = Path(directory) / _digest(header)
    if sync.is_main:
        _prepare(folder, header, layout, paths)
    sync.barrier()
    index = _read_index(folder, header, layout)
    if index is None:
        raise RuntimeError(f"The feature cache index in {folder} vanished or changed while opening it.")
    memmap = np.memmap(folder / DATA_NAME, dtype=_numpy_dtype(layout), mode="r+", shape=(len(paths), layout.row_numel))
    storage = _Storage(torch.from_numpy(memmap), memmap, folder, temporary)
    checksums = np.asarray(index["checksums"], dtype=np.int64)
    return FeatureCache(layout, paths, storage, checksums, sync, key.get("image_size"), key.get("pre_processing"))


def _digest(header: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(header, sort_keys=True).encode(), digest_size=10).hexdigest()


def _numpy_dtype(layout: FeatureLayout) -> np.dtype:
    return np.dtype(str(layout.dtype).removeprefix("torch."))


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


def _prepare(folder: Path, header: dict[str, Any], layout: FeatureLayout, paths: Sequence[str]) -> None:
    """Validate an existing cache (dropping rows of changed images) or create an empty one."""
    signatures = _file_signatures(paths)
    index = _read_index(folder, header, layout)
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


def _read_index(folder: Path, header: dict[str, Any], layout: FeatureLayout) -> dict[str, Any] | None:
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


def _update_index(folder: Path, checksums: np.ndarray) -> None:
    index = json.loads((folder / INDEX_NAME).read_text())
    index["checksums"] = [int(value) for value in checksums]
    _write_index(folder, index)


# --------------------------------------------------------------------------------------------------------------------
# Lightning integration
# --------------------------------------------------------------------------------------------------------------------


def visual_features(
    encoder: VisualEncoder,
    images: torch.Tensor,
    image_paths: Sequence[str] | None,
    cache: FeatureCache | None,
    record: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The frozen encoder's outputs for a batch, through the cache when there is one.

    Args:
        encoder: the visual encoder.
        images: (B, 3, H, W) pre-processed images.
        image_paths: their paths (needed with a cache).
        cache: the feature cache, or ``None``.
        record: see :meth:`FeatureCache.features` (``False`` for validation).
    """
    if cache is None or image_paths is None:
        with torch.no_grad():
            return encoder(images)
    return cache.features(images, image_paths, encoder, record=record)


def training_feature_cache(
    trainer: Any, module: Any, directory: str | Path | None = None, dtype_name: str = "float32"
) -> FeatureCache | None:
    """The feature cache for a Lightning prompt-training run, or ``None`` when caching would be wrong.

    Args:
        trainer: the Lightning trainer, after its training data loader was set up.
        module: the :class:`~anomalib_anomalyclip.AnomalyCLIP` module (``model``, ``pre_processor``).
        directory: folder for a persistent memory-mapped cache; ``None`` keeps the cache
            in memory when it fits, else in a temporary folder below ``default_root_dir``.
        dtype_name: storage precision, ``float32`` or ``float16``.

    Returns:
        The opened cache, or ``None`` (the reason is logged).
    """
    dataset = _stage_dataset(trainer, "train_dataloader", "train_data")
    paths, transforms, reason = _cacheable_inputs(dataset, module.pre_processor)
    if reason:
        logger.info("Feature cache off: %s.", reason)
        return None
    encoder = module.model.visual_encoder
    size = (module.model.image_size, module.model.image_size)
    layout = FeatureLayout.for_encoder(encoder, size, dtype_name)
    location, sync, temporary = _location(trainer, directory, layout.row_bytes * len(set(paths)))
    # Only a cache on disk can meet features of other weights or settings; hashing ViT-L's weights takes seconds.
    if location is None:
        key = input_key(size, transforms)
    else:
        key = cache_key(encoder, size, transforms, str(trainer.precision), module.device.type)
    cache = open_feature_cache(key, layout, paths, location, sync, temporary)
    where = "in memory" if cache.directory is None else f"memory-mapped in {cache.directory}"
    shared = f", shared by {sync.world_size} processes" if sync.world_size > 1 else ""
    if sync.is_main:
        logger.info("Feature cache: %s, %s%s.", layout.describe(cache.capacity), where, shared)
    return cache


def validation_feature_cache(trainer: Any, module: Any, cache: FeatureCache | None) -> FeatureCache | None:
    """The training feature cache, if it may also serve the validation that ``fit`` runs between epochs.

    It may when the validation images are pre-processed exactly as the training images (no
    random augmentation, the same transforms): then an image path in both sets has the same
    features. By default :class:`~anomalib_anomalyclip.data.AuxiliaryDataModule` validates on
    the training images themselves, so after the first epoch validation runs no visual encoder.

    Args:
        trainer: the Lightning trainer, with its validation data loader set up.
        module: the :class:`~anomalib_anomalyclip.AnomalyCLIP` module (``pre_processor``).
        cache: the open training cache, or ``None``.

    Returns:
        ``cache`` or ``None`` (the reason is logged once per fit).
    """
    if cache is None:
        return None
    dataset = _stage_dataset(trainer, "val_dataloaders", "val_data")
    _, transforms, reason = _cacheable_inputs(dataset, module.pre_processor)
    if not reason and [repr(transform) for transform in transforms] != cache.pre_processing:
        reason = "the validation images are pre-processed differently from the training images"
    if reason:
        if not cache.validation_refusal_logged:
            logger.info("Feature cache not used for validation: %s.", reason)
            cache.validation_refusal_logged = True
        return None
    return cache


def _stage_dataset(trainer: Any, loader_attribute: str, datamodule_attribute: str) -> Any:
    """The dataset of the trainer's loader (the first, if a list), else the datamodule's dataset attribute."""
    loader = getattr(trainer, loader_attribute, None)
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        dataset = getattr(getattr(trainer, "datamodule", None), datamodule_attribute, None)
    return dataset


def _cacheable_inputs(dataset: Any, pre_processor: Any) -> tuple[list[str], list[object], str]:
    """Image paths and transforms of the training data, or the reason why they cannot be cached."""
    samples = getattr(dataset, "samples", None)
    if samples is None or "image_path" not in getattr(samples, "columns", ()):
        return [], [], "the training dataset does not list its images (no samples.image_path)"
    if pre_processor is not None and not hasattr(pre_processor, "transform"):
        return [], [], f"the pre-processor {type(pre_processor).__name__} does not expose its transform"
    transforms = [getattr(dataset, "augmentations", None), getattr(pre_processor, "transform", None)]
    generators = list(getattr(dataset, "random_transforms", ()))  # e.g. anomalies made anew at every load
    random = [name for transform in transforms + generators for name in nondeterministic_transforms(transform)]
    if random:
        return [], [], f"the training images are augmented ({', '.join(random)}), so every epoch sees new pixels"
    return [str(path) for path in samples["image_path"]], transforms, ""


def _location(trainer: Any, directory: str | Path | None, size: int) -> tuple[Path | None, RankSync, bool]:
    """Folder (``None``: memory), process synchronisation and whether the folder is temporary."""
    temporary = directory is None
    base = Path(directory) if directory is not None else Path(trainer.default_root_dir) / "feature_cache"
    if trainer.world_size > 1:
        sync = _distributed_sync() if getattr(trainer, "num_nodes", 1) == 1 else None
        if sync is None:  # e.g. ranks on other machines, which cannot see this machine's file
            return base / f"rank{trainer.global_rank}", RankSync(), temporary
        # Rank 0's folder: anomalib gives every rank a versioned default_root_dir of its own.
        return Path(sync.share(str(base.absolute()))), sync, temporary
    available = _available_memory()
    if directory is None and available is not None and size <= MEMORY_FRACTION * available:
        return None, RankSync(), False
    return base, RankSync(), temporary


def _distributed_sync() -> RankSync | None:
    """Synchronisation over a gloo process group of the cache's own, ``None`` without torch.distributed.

    Not over Lightning's default group: callbacks such as the progress bar run collectives
    on rank 0 alone (syncing logged metrics early), so a collective of ours on that group
    could pair with a different collective on another rank.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.is_gloo_available()):
        return None
    group = dist.new_group(backend="gloo")

    def total(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    def share(value: Any) -> Any:
        objects = [value]
        dist.broadcast_object_list(objects, src=0, group=group)
        return objects[0]

    return RankSync(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        barrier=lambda: dist.barrier(group=group),
        sum=total,
        share=share,
        release=lambda: dist.destroy_process_group(group),
    )


def _available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), ``None`` if unknown."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
