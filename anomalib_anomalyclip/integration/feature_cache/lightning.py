"""The feature cache in a Lightning run: the callback that opens and closes it, and what it decides.

:class:`FeatureCacheCallback` runs the cache's lifecycle around ``fit``; the module's
training and validation steps pass what it provides to :meth:`.AnomalyCLIPModel.visual_features`.
:func:`training_feature_cache` decides whether the training data may be cached (see
:mod:`.transforms`), where (:func:`cache_location`) and under which key (:mod:`.key`).

Where: in memory when it fits (single process, no ``feature_cache.dir``, at most half of
the available memory), else memory-mapped in ``feature_cache.dir`` (persistent, reused by
later runs with the same key) or in a temporary folder below the trainer's
``default_root_dir`` (removed at the end of training).

Validation during ``fit``: :func:`validation_feature_cache` lets the validation pass between
epochs read the cache when the validation images are pre-processed exactly as the training
images (AuxiliaryDataModule validates on the training images by default). Validation only
reads: images the cache does not hold are encoded and not stored, and its reads are not
counted in the epoch's hits and misses.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import torch
from lightning.pytorch import Callback

from anomalib_anomalyclip.integration.feature_cache.key import cache_key, input_key
from anomalib_anomalyclip.integration.feature_cache.layout import FeatureLayout
from anomalib_anomalyclip.integration.feature_cache.store import FeatureCache, open_feature_cache
from anomalib_anomalyclip.integration.feature_cache.sync import RankSync, distributed_sync
from anomalib_anomalyclip.integration.feature_cache.transforms import cacheable_inputs

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

    from anomalib_anomalyclip.method.dpam import DualPathVisualEncoder

logger = logging.getLogger(__name__)

__all__ = [
    "MEMORY_FRACTION",
    "FeatureCacheCallback",
    "FeatureCacheSettings",
    "FeatureSource",
    "PromptTrainingModule",
    "cache_location",
    "training_feature_cache",
    "validation_feature_cache",
]

MEMORY_FRACTION = 0.5  # of the available memory, at most, for a cache in memory


class FeatureModel(Protocol):
    """The torch model whose visual features are cached."""

    visual_encoder: DualPathVisualEncoder
    image_size: int


class FeatureSource(Protocol):
    """What the cache reads from the Lightning module: the torch model, the pre-processor and the device."""

    model: FeatureModel
    pre_processor: object
    device: torch.device


class FeatureCacheSettings(Protocol):
    """The settings that switch the cache on and place it (:class:`~anomalib_anomalyclip.config.FeatureCaching`)."""

    enabled: bool
    dir: str | None
    dtype: str


class CachingConfig(Protocol):
    """The part of the module's configuration the cache reads."""

    feature_cache: FeatureCacheSettings


class PromptLearning(Protocol):
    """Whether the module learns its prompts in this fit."""

    learns: bool


class PromptTrainingModule(FeatureSource, Protocol):
    """The Lightning module's side of :class:`FeatureCacheCallback`'s contract."""

    config: CachingConfig
    prompt_state: PromptLearning
    train_features: FeatureCache | None
    val_features: FeatureCache | None


class FeatureCacheCallback(Callback):
    """Opens, advances and closes the training feature cache of a prompt-training ``fit``.

    Contract with the Lightning module (:class:`PromptTrainingModule`): the callback reads
    ``prompt_state.learns`` and ``config.feature_cache`` (``enabled``, ``dir``, ``dtype``), and sets two
    attributes, each a :class:`FeatureCache` or
    ``None`` (no cache): ``train_features``, which ``training_step`` passes to
    :meth:`.AnomalyCLIPModel.visual_features`, and ``val_features``, which ``validation_step`` passes with
    ``record=False``. The module adds the callback in ``configure_callbacks`` and sets
    both attributes to ``None`` in ``__init__``.

    Hooks: ``on_train_start`` opens the cache (when the module learns prompts and
    ``feature_cache`` is on), ``on_train_epoch_start`` calls :meth:`FeatureCache.begin_epoch`,
    ``on_train_end`` closes it (both attributes become ``None``), ``on_validation_start``
    sets ``val_features`` to the training cache when it may serve this validation.
    """

    def __init__(self) -> None:
        self._cache: FeatureCache | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Open the feature cache of the training images, if the module asks for one."""
        module = cast("PromptTrainingModule", pl_module)
        settings = module.config.feature_cache
        if module.prompt_state.learns and settings.enabled:
            self._cache = training_feature_cache(trainer, module, settings.dir, settings.dtype)
        module.train_features = self._cache

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Share and log the previous epoch's fill and reuse (see :meth:`FeatureCache.begin_epoch`)."""
        del trainer, pl_module
        if self._cache is not None:
            self._cache.begin_epoch()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Release the feature cache (a temporary folder is removed)."""
        del trainer
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        module = cast("PromptTrainingModule", pl_module)
        module.train_features = module.val_features = None

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Serve fit's validation from the training feature cache when the images are pre-processed alike."""
        module = cast("PromptTrainingModule", pl_module)
        module.val_features = validation_feature_cache(trainer, module, self._cache)


def training_feature_cache(
    trainer: Trainer, module: FeatureSource, directory: str | Path | None = None, dtype_name: str = "float32"
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
    paths, transforms, reason = cacheable_inputs(dataset, module.pre_processor)
    if reason:
        logger.info("Feature cache off: %s.", reason)
        return None
    encoder = module.model.visual_encoder
    size = (module.model.image_size, module.model.image_size)
    layout = FeatureLayout.for_encoder(encoder, size, dtype_name)
    location, sync, temporary = cache_location(trainer, directory, layout.row_bytes * len(set(paths)))
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


def validation_feature_cache(
    trainer: Trainer, module: FeatureSource, cache: FeatureCache | None
) -> FeatureCache | None:
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
    _, transforms, reason = cacheable_inputs(dataset, module.pre_processor)
    if not reason and [repr(transform) for transform in transforms] != cache.pre_processing:
        reason = "the validation images are pre-processed differently from the training images"
    if reason:
        if not cache.validation_refusal_logged:
            logger.info("Feature cache not used for validation: %s.", reason)
            cache.validation_refusal_logged = True
        return None
    return cache


def _stage_dataset(trainer: Trainer, loader_attribute: str, datamodule_attribute: str) -> object:
    """The dataset of the trainer's loader (the first, if a list), else the datamodule's dataset attribute."""
    loader = getattr(trainer, loader_attribute, None)
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        dataset = getattr(getattr(trainer, "datamodule", None), datamodule_attribute, None)
    return dataset


def cache_location(trainer: Trainer, directory: str | Path | None, size: int) -> tuple[Path | None, RankSync, bool]:
    """Where a cache of ``size`` bytes lives, and who shares it.

    Args:
        trainer: the Lightning trainer (``world_size``, ``num_nodes``, ``global_rank``, ``default_root_dir``).
        directory: the user's folder for a persistent cache, or ``None``.
        size: bytes of the whole cache.

    Returns:
        The folder (``None``: memory), the process synchronisation and whether the folder is temporary.
    """
    temporary = directory is None
    base = Path(directory) if directory is not None else Path(trainer.default_root_dir) / "feature_cache"
    if trainer.world_size > 1:
        sync = distributed_sync() if getattr(trainer, "num_nodes", 1) == 1 else None
        if sync is None:  # e.g. ranks on other machines, which cannot see this machine's file
            return base / f"rank{trainer.global_rank}", RankSync(), temporary
        # Rank 0's folder: anomalib gives every rank a versioned default_root_dir of its own.
        return Path(sync.share(str(base.absolute()))), sync, temporary
    available = _available_memory()
    if directory is None and available is not None and size <= MEMORY_FRACTION * available:
        return None, RankSync(), False
    return base, RankSync(), temporary


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
