"""Auxiliary labelled training data for AnomalyCLIP.

AnomalyCLIP learns its prompts once on an auxiliary *labelled* dataset (normal and anomalous images, with pixel masks
where available), e.g. the test split of every category of MVTec AD, and then detects anomalies zero-shot on other
datasets. anomalib's own train splits hold normal images only, so :class:`AuxiliaryDataModule` builds its training set
from the labelled test split of every category of one or more *sources*:

``mvtec``
    MVTec AD's layout ``root/<category>/test/<good|defect>/<image>`` with masks
    ``root/<category>/ground_truth/<defect>/<stem>[_mask].<ext>``. Every category folder below ``root`` is used
    unless ``categories`` lists some. MPDD, BTAD and anomalib's split VisA (``visa_pytorch``) share this layout.
``visa``
    VisA: anomalib's split copy (``root/visa_pytorch/...``, MVTec layout), the raw download (the test rows of
    ``root/split_csv/1cls.csv``), or ``root`` itself in MVTec layout.
``folder``
    A labelled folder: ``normal_dir`` and/or ``abnormal_dir`` (folder or list of folders, relative to ``root``) and an
    optional ``mask_dir``; the category name is ``name`` (default: the root folder's name).
``synthetic``
    Normal images with anomalies made from them by anomalib's Perlin generator (see
    :mod:`~anomalib_anomalyclip.data.anomaly_synthesis`).

Each source is a :class:`~anomalib_anomalyclip.data.sources.SourceSpec` (in YAML a mapping with its fields; from
Python a plain mapping works too), so anomalib's CLI checks its ``format``, keys and value types while parsing.

Images without a pixel mask (a ``folder`` source without ``mask_dir``, or any source with ``require_masks: false``
whose anomalous image has no mask file) stay usable: their ``gt_mask`` is all zeros and their ``mask_path`` in the
batch is the empty string ``""``. A batch therefore says "anomalous image without a pixel annotation" through
``gt_label == 1 and mask_path == ""`` (see :func:`has_pixel_mask`); the zero masks of normal images are real
annotations.

Validation and test data: by default (``val_split_ratio=0``) the validation and test sets are the same labelled images
as the training set. The zero-shot protocol never evaluates on the auxiliary data; anomalib's Engine only needs a
validation pass to collect normalisation and threshold statistics, and those are best taken on labelled images that
hold both classes. With ``0 < val_split_ratio < 1`` that fraction of every (category, label) group is held out of
training instead (deterministic from ``seed``) and used for validation and test.

Example YAML (``anomalib fit --config ...``)::

    data:
      class_path: anomalib_anomalyclip.data.AuxiliaryDataModule
      init_args:
        sources:
          - {format: mvtec, root: ./datasets/MVTecAD}
          - {format: visa, root: ./datasets/visa, categories: [candle, pcb1]}
          - {format: folder, root: ./my_parts, normal_dir: good, abnormal_dir: bad, mask_dir: masks}
        train_batch_size: 8
        eval_batch_size: 8
        num_workers: 4
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.data.dataclasses import ImageBatch, ImageItem
from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName
from pandas import DataFrame
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import Transform
from torchvision.tv_tensors import Image, Mask

from anomalib_anomalyclip.data.anomaly_synthesis import make_anomaly, regeneration_plan
from anomalib_anomalyclip.data.images import BadImageError, read_image, read_mask
from anomalib_anomalyclip.data.samples import check_sample_files, collate_auxiliary, collect_samples, mask_size_message
from anomalib_anomalyclip.data.scanners import SAMPLE_COLUMNS
from anomalib_anomalyclip.data.sources import SourceSpec, source_specs

__all__ = ["AuxiliaryDataModule", "AuxiliaryDataset"]

logger = logging.getLogger(__name__)


class AuxiliaryDataset(AnomalibDataset):
    """Labelled images (normal and anomalous, masks where available) from one or more sources.

    Items are :class:`~anomalib.data.ImageItem` exactly as anomalib's datasets make them: ``image`` float in
    ``[0, 1]`` (C, H, W), ``gt_label`` (0 normal, 1 anomalous), ``gt_mask`` (H, W), ``image_path``, ``mask_path``
    (``None`` at item level when there is no mask file; use :func:`collate_auxiliary` for batches). ``gt_mask`` is all
    zeros for normal images and for anomalous images without a mask. Images are read with
    :func:`~anomalib_anomalyclip.data.images.read_image` (16-bit, grayscale and transparent images converted
    deliberately). A mask whose size differs from its image's raises :class:`BadImageError` (a ``ValueError``) when
    the item is loaded: masks are never resized silently. :class:`AuxiliaryDataModule` checks every file before
    training.

    Args:
        samples: Samples table as made by :func:`collect_samples` (columns :data:`SAMPLE_COLUMNS`).
        augmentations: Transforms applied jointly to image and mask.
        regenerated: Anomalous images to make anew each time they are loaded: image path -> (the normal image it
            was made from, anomalib's anomaly generator); see
            :func:`~anomalib_anomalyclip.data.anomaly_synthesis.regeneration_plan`.
    """

    def __init__(
        self,
        samples: DataFrame,
        augmentations: Transform | None = None,
        regenerated: Mapping[str, tuple[str, Any]] | None = None,
    ) -> None:
        super().__init__(augmentations=augmentations)
        self.regenerated = dict(regenerated or {})
        missing = [column for column in SAMPLE_COLUMNS if column not in samples.columns]
        if missing:
            msg = f"AuxiliaryDataset samples lack column(s) {missing}; build them with collect_samples()."
            raise ValueError(msg)
        task = samples.attrs.get("task") or ("segmentation" if (samples["mask_path"] != "").any() else "classification")
        samples = samples.copy()
        samples.attrs["task"] = task
        self.samples = samples

    @property
    def categories(self) -> list[str]:
        """Sorted category names of the images."""
        return sorted(self.samples["category"].unique())

    @property
    def random_transforms(self) -> list[Any]:
        """The anomaly generators of the regenerated images (every load gives new pixels: no feature cache)."""
        return list({id(generator): generator for _, generator in self.regenerated.values()}.values())

    def __getitem__(self, index: int) -> ImageItem:
        """Load one labelled image with its mask.

        Args:
            index: Position in the samples table.

        Returns:
            The item.

        Raises:
            BadImageError: If the image or its mask cannot be read, or the mask does not have the image's size
                (a ``ValueError``).
        """
        row = self.samples.iloc[index]
        if row.image_path in self.regenerated:
            source, generator = self.regenerated[row.image_path]
            image, mask = make_anomaly(generator, read_image(source))
            image, gt_mask = Image(image), Mask(mask)
        else:
            image = read_image(row.image_path)
            gt_mask = self._load_mask(row.image_path, row.mask_path, int(row.label_index), tuple(image.shape[-2:]))
        if self.augmentations:
            image, gt_mask = self.augmentations(image, gt_mask)
        return ImageItem(
            image=image,
            gt_mask=gt_mask,
            gt_label=torch.tensor(int(row.label_index)),
            image_path=row.image_path,
            mask_path=row.mask_path,
        )

    @staticmethod
    def _load_mask(image_path: str, mask_path: str, label_index: int, size: tuple[int, int]) -> Mask:
        """The image's mask, all zeros for normal images and for anomalous images without a mask file."""
        if label_index == LabelName.NORMAL or not mask_path:
            return Mask(torch.zeros(size, dtype=torch.uint8))
        mask = read_mask(mask_path)
        if tuple(mask.shape[-2:]) != size:
            raise BadImageError(mask_size_message(image_path, mask_path, size[::-1], mask.shape[::-1]))
        return mask

    @property
    def collate_fn(self) -> Callable[[list[ImageItem]], ImageBatch]:
        """Collate function that keeps one ``mask_path`` string per image (see :func:`collate_auxiliary`)."""
        return collate_auxiliary


# --------------------------------------------------------------------------------------------------------------------
# Datamodule
# --------------------------------------------------------------------------------------------------------------------


def _held_out(samples: DataFrame, ratio: float, seed: int) -> np.ndarray:
    """Boolean mask of the rows held out for validation, stratified by (category, label)."""
    rng = np.random.default_rng(seed)
    held_out = np.zeros(len(samples), dtype=bool)
    for _, positions in sorted(samples.groupby(["category", "label_index"]).indices.items()):
        count = round(len(positions) * ratio)
        held_out[rng.permutation(positions)[:count]] = True
    return held_out


class AuxiliaryDataModule(AnomalibDataModule):
    """Train on the labelled test split of every category of one or more datasets.

    The training set concatenates, over all sources, every category's normal and anomalous test images (with masks
    where the source has them); see the module docstring for the source formats and the mask convention
    (``gt_label == 1 and mask_path == ""`` marks an anomalous image without pixel annotation).

    Validation and test sets: the same labelled images by default; with ``0 < val_split_ratio < 1`` that fraction
    of every (category, label) group is held out of training (chosen with ``seed``) and serves as both.

    Args:
        sources: The sources, as :class:`~anomalib_anomalyclip.data.sources.SourceSpec` or plain mappings of its
            fields, e.g. ``[{"format": "mvtec", "root": "./datasets/MVTecAD"}]``: ``format`` (``mvtec``, ``visa``,
            ``folder`` or ``synthetic``), ``root``, optional ``extensions`` and ``require_masks``;
            ``mvtec``/``visa``: optional ``categories``; ``folder``: ``normal_dir``, ``abnormal_dir``, optional
            ``mask_dir`` and ``name``; ``synthetic``: see :mod:`~anomalib_anomalyclip.data.anomaly_synthesis`.
        root: Shortcut for a single MVTec-layout source, ``sources=[{"format": "mvtec", "root": root}]``.
        train_batch_size: Training batch size.
        eval_batch_size: Validation/test batch size.
        num_workers: Data loader workers.
        train_augmentations: Augmentations of the training images (applied to image and mask).
        val_augmentations: Augmentations of the validation images.
        test_augmentations: Augmentations of the test images.
        augmentations: Augmentations for every subset without its own.
        val_split_ratio: Fraction held out for validation/test; ``0`` uses all images for training and evaluation.
        seed: Seed of the held-out split.

    Raises:
        TypeError: If a source is neither a mapping nor a :class:`~anomalib_anomalyclip.data.sources.SourceSpec`.
        ValueError: If neither or both of ``sources`` and ``root`` are given, a source is invalid, or
            ``val_split_ratio`` is outside ``[0, 1)``.

    Example:
        >>> datamodule = AuxiliaryDataModule(root="./datasets/MVTecAD", train_batch_size=8)
        >>> datamodule.setup()
        >>> batch = next(iter(datamodule.train_dataloader()))
        >>> datamodule.class_names_for(batch.image_path)[:2]
        ['bottle', 'cable']
    """

    def __init__(
        self,
        sources: list[SourceSpec] | None = None,
        root: str | Path | None = None,
        train_batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 4,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        val_split_ratio: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            seed=seed,
        )
        if not 0.0 <= val_split_ratio < 1.0:
            msg = f"val_split_ratio must be in [0, 1), got {val_split_ratio}."
            raise ValueError(msg)
        self.val_split_ratio = val_split_ratio  # the base class turns 0 into 0.5
        self.sources = source_specs(sources, root)
        self.category = "+".join(dict.fromkeys(spec.display_name for spec in self.sources))
        self._labelled: DataFrame | None = None
        self._path_to_category: dict[str, str] | None = None

    @property
    def samples(self) -> DataFrame:
        """Every labelled image of every source (scanned and checked with :func:`check_sample_files` once)."""
        if self._labelled is None:
            self._labelled = collect_samples(self.sources)
            check_sample_files(self._labelled)
            self._log_summary(self._labelled)
        return self._labelled

    @property
    def categories(self) -> list[str]:
        """Sorted category names over all sources."""
        return sorted(self.samples["category"].unique())

    def _setup(self, _stage: str | None = None) -> None:
        """Build the train, validation and test datasets from the labelled images."""
        samples = self.samples
        if self.val_split_ratio > 0:
            held_out = _held_out(samples, self.val_split_ratio, self.seed)
            if held_out.all() or not held_out.any():
                msg = (
                    f"val_split_ratio={self.val_split_ratio} holds out {int(held_out.sum())} of {len(samples)} "
                    "images; choose a ratio that leaves images on both sides."
                )
                raise ValueError(msg)
            train, evaluation = samples[~held_out], samples[held_out]
        else:
            train, evaluation = samples, samples
        self.train_data = AuxiliaryDataset(train, regenerated=regeneration_plan(self.sources, train))
        self.val_data = AuxiliaryDataset(evaluation)
        self.test_data = AuxiliaryDataset(evaluation)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, in an order fixed by ``seed`` (anomalib's CLI does not seed runs)."""
        return DataLoader(
            dataset=self.train_data,
            shuffle=True,
            batch_size=self.train_batch_size,
            num_workers=self.num_workers,
            collate_fn=self.external_collate_fn or self.train_data.collate_fn,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _create_test_split(self) -> None:
        """Keep the test set built by :meth:`_setup` (the base class would drop its normal images)."""

    def _create_val_split(self) -> None:
        """Keep the validation set built by :meth:`_setup`."""

    def class_names_for(self, image_paths: Sequence[str | Path]) -> list[str]:
        """Category name of each image, for object-aware prompts.

        The category is the MVTec/VisA category folder, or a folder source's ``name``.

        Args:
            image_paths: Paths as found in ``batch.image_path`` (other spellings of the same file are accepted).

        Returns:
            One category name per path.

        Raises:
            KeyError: If a path is not an image of this datamodule's sources.
        """
        if self._path_to_category is None:
            self._path_to_category = dict(zip(self.samples["image_path"], self.samples["category"], strict=True))
        names = []
        for path in image_paths:
            name = self._path_to_category.get(str(path)) or self._path_to_category.get(os.path.abspath(path))
            if name is None:
                msg = f"{path} is not an image of this datamodule's sources ({self.category})."
                raise KeyError(msg)
            names.append(name)
        return names

    @staticmethod
    def _log_summary(samples: DataFrame) -> None:
        counts = samples.groupby("category")["label_index"].agg(["size", "sum"])
        without_mask = int(((samples["label_index"] == LabelName.ABNORMAL) & (samples["mask_path"] == "")).sum())
        logger.info(
            "Auxiliary data: %d images (%d anomalous, %d of them without mask) in %d categories: %s",
            len(samples),
            int(samples["label_index"].sum()),
            without_mask,
            len(counts),
            ", ".join(f"{name} {row['size']}/{row['sum']}" for name, row in counts.iterrows()),
        )
